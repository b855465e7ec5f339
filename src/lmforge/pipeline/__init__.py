"""`lmforge pipeline run`: the whole chain from one YAML file (spec, plan and run, report)."""

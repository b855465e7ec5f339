"""Text for `lmforge demo`: `shakespeare.txt`, the first 120 kB of tinyshakespeare (public-domain
Shakespeare as collected in karpathy/char-rnn), so the demo trains on a fresh machine offline."""

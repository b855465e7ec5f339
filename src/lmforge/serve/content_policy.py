"""Applying the moderation policy to generation requests (the rules are `serve.moderation`'s).

Input: after admission, the prompt text is checked under the policy of the caller's key and the
model. `block` and flagged → 400 `content_policy_violation`, a ledger row with status `blocked`
(nothing billed) and an audit entry; `flag` → served, with the categories in the response's
`x-lmforge-moderation` header and the log.

Output: with an output policy other than `off`, each choice's text is checked. Under `block`, a
flagged choice is withheld — its text emptied and its `finish_reason` "content_filter", as
OpenAI does — and an audit entry is written; a stream stops at the first flagged piece with a
"content_filter" chunk (checked on the newest 512 characters of each choice, which covers
every rule that matches within that span).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmforge.registry.audit import record_audit
from lmforge.serve.context import Caller
from lmforge.serve.errors import OpenAIError
from lmforge.serve.moderation import ModerationService
from lmforge.serve.state import ServedModel

if TYPE_CHECKING:
    from sqlalchemy import Engine as SqlEngine

_WINDOW = 512
HEADER = "x-lmforge-moderation"


@dataclass(frozen=True)
class PolicyContext:
    """What checking one request's texts needs: the rules, where audits go, who asks, which
    model."""

    service: ModerationService
    registry: SqlEngine
    caller: Caller
    served: ServedModel

    def audit_block(self, direction: str, categories: list[str], rules: str) -> None:
        """Record a block in the audit log (blocking: call it in a thread)."""
        with self.registry.begin() as conn:
            record_audit(
                conn,
                actor=self.caller.actor,
                action="moderation.block",
                target=self.served.name,
                details={
                    "request_id": self.caller.request_id,
                    "direction": direction,
                    "categories": categories,
                    "ruleset": rules,
                },
            )

    @property
    def key_name(self) -> str | None:
        key = self.caller.key
        return None if key is None else key.name


async def check_input(policy: PolicyContext, prompts: list[list[int]], param: str) -> None:
    """Apply the input policy to the prompts' text; raise the 400 when it blocks them (the
    request's `metering.settling` records it as "blocked")."""
    served = policy.served
    texts = [served.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    verdict = await asyncio.to_thread(
        policy.service.verdict, policy.key_name, served.name, texts, "input"
    )
    if not verdict.flagged:
        return
    policy.caller.add_headers({HEADER: "input:" + ",".join(verdict.categories)})
    if not verdict.blocked:
        return
    await asyncio.to_thread(policy.audit_block, "input", verdict.categories, verdict.ruleset_id)
    raise OpenAIError(
        400,
        "The prompt was refused by this server's content policy "
        f"(categories: {', '.join(verdict.categories)}).",
        param=param,
        code="content_policy_violation",
    )


@dataclass
class OutputFilter:
    """The output policy of one request, applied to whole texts or to a stream's pieces."""

    policy: PolicyContext
    action: str  # "off" | "flag" | "block"
    texts: dict[int, str] = field(default_factory=dict)  # per choice, the newest characters
    flagged: set[str] = field(default_factory=set)
    rules: str = ""  # the ruleset id of the last check
    reported: bool = False

    @classmethod
    async def of(cls, policy: PolicyContext) -> OutputFilter:
        found = await asyncio.to_thread(policy.service.policy, policy.key_name, policy.served.name)
        return cls(policy, found.output)

    def _check(self, texts: list[str]) -> list[list[str]]:
        """The flagged categories of each text (blocking: call it in a thread)."""
        rules, results = self.policy.service.moderate(texts)
        self.rules = rules
        return [r.flagged_categories for r in results]

    async def apply(self, choices: list[Any]) -> None:
        """Check whole CHOICES (non-streamed); under block, withhold the flagged ones."""
        if self.action == "off" or not choices:
            return
        flags = await asyncio.to_thread(self._check, [c.text for c in choices])
        for choice, categories in zip(choices, flags, strict=True):
            if categories:
                self.flagged.update(categories)
                if self.action == "block":
                    choice.text = ""
                    choice.finish_reason = "content_filter"
        await self._report()

    async def blocks(self, index: int, text: str) -> bool:
        """Add streamed TEXT of choice INDEX; True if the stream must stop here (block)."""
        if self.action == "off" or not text:
            return False
        window = (self.texts.get(index, "") + text)[-_WINDOW:]
        self.texts[index] = window
        (categories,) = await asyncio.to_thread(self._check, [window])
        if not categories:
            return False
        new = not set(categories) <= self.flagged
        self.flagged.update(categories)
        if self.action == "block":
            await self._report()
            return True
        if new:
            await self._report()
        return False

    async def _report(self) -> None:
        if not self.flagged or (self.reported and self.action == "block"):
            return
        self.reported = True
        categories = sorted(self.flagged)
        self.policy.caller.add_headers({HEADER: "output:" + ",".join(categories)})  # unsent only
        if self.action == "block":
            await asyncio.to_thread(self.policy.audit_block, "output", categories, self.rules)

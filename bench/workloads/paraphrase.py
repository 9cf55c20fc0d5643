#!/usr/bin/env python3
"""Derive a paraphrase trace from the reference trace: FAQ questions asked in many wordings.

Usage: paraphrase.py [--jobs 2000] [--seed 7] [--out FILE]
   or: paraphrase.py --from reference.jsonl [--seed 7] [--out FILE]

The reference generator (make_workload.py, kept byte for byte) asks each support_faq question
in one wording, so only an exact cache is ever tested by it. This trace keeps every line of
the reference trace (time, feature, tenant, priority, request) and changes only the
support_faq lines:

- Each of the reference's FAQ questions (told apart by their text) stands for one *intent*
  of INTENTS: an action on a thing ("cancel" + "subscription"), 60 in all. Which question
  stands for which intent is a shuffle seeded by --seed that keeps the intents of one thing
  next to each other (near_misses_together), so that frequent questions have frequent
  near-misses.
- Each support_faq job asks its question's intent in a wording drawn (seeded by --seed and the
  job's line number) from TEMPLATES, with the action and the thing in one of their surface
  forms (ACTIONS, THINGS: "terminate my membership" for cancel + subscription), and, for
  DETAIL_SHARE of the jobs, a detail that does not change what is asked ("on the mobile
  app"). A few surface forms are ones an embedding model may not know as synonyms ("close
  out", "take a break from"), as in real traffic.
- The line gains "group": the intent (e.g. "cancel/subscription"), for grading only: what
  a benchmark compares to decide whether an answer served from the cache was asked for the
  same thing. No producer sends it; tokenq never sees it.

Intents that share a thing or an action ("cancel/subscription", "pause/subscription",
"cancel/order") are each other's near-misses: similar words, a different intent. Every
intent has several, by construction of INTENTS.

Deterministic: the same reference trace and --seed give the same trace, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

ACTIONS: dict[str, tuple[str, ...]] = {
    "cancel": ("cancel", "terminate", "end", "stop", "shut down", "close out"),
    "pause": ("pause", "freeze", "suspend", "put on hold", "take a break from"),
    "resume": ("resume", "restart", "reactivate"),
    "upgrade": ("upgrade", "move up"),
    "downgrade": ("downgrade", "scale back", "move down"),
    "change": ("change", "update", "modify", "edit", "swap"),
    "reset": ("reset", "recover"),
    "track": ("track", "follow", "trace", "locate"),
    "return": ("return", "send back"),
    "refund": ("get a refund for", "get my money back for", "be reimbursed for"),
    "export": ("export", "download"),
    "delete": ("delete", "remove", "erase", "get rid of"),
    "add": ("add", "create", "set up"),
    "pay": ("pay", "settle"),
}
THINGS: dict[str, tuple[str, ...]] = {
    "subscription": ("subscription", "membership", "plan"),
    "order": ("order", "purchase", "package"),
    "password": ("password", "passcode"),
    "email": ("email address", "e-mail", "email"),
    "shipping": ("shipping address", "delivery address"),
    "invoice": ("invoice", "bill", "receipt"),
    "card": ("credit card", "payment card", "card", "payment method"),
    "account": ("account", "profile"),
    "report": ("usage report", "report", "dashboard"),
    "apikey": ("api key", "api token", "access key"),
    "webhook": ("webhook", "callback url"),
    "twofactor": ("two-factor login", "2fa", "two factor authentication"),
    "seat": ("user seat", "seat", "license"),
}
INTENTS: tuple[tuple[str, str], ...] = tuple(
    (action, thing)
    for thing, actions in (
        ("subscription", "cancel pause resume upgrade downgrade change pay add"),
        ("order", "cancel track return refund change pay add pause"),
        ("password", "reset change add"),
        ("email", "change add delete"),
        ("shipping", "change add delete"),
        ("invoice", "export pay change add"),
        ("card", "change add delete pause resume"),
        ("account", "delete pause resume export add"),
        ("report", "export add delete change pause"),
        ("apikey", "reset add delete change"),
        ("webhook", "add delete change pause resume"),
        ("twofactor", "add reset delete change"),
        ("seat", "add delete change"),
    )
    for action in actions.split()
)
TEMPLATES = (
    "How do I {a} my {t}?",
    "How can I {a} my {t}?",
    "What is the way to {a} my {t}?",
    "Can you tell me how to {a} my {t}?",
    "I want to {a} my {t}. What are the steps?",
    "I'd like to {a} my {t}, how do I do that?",
    "Is it possible to {a} my {t}?",
    "Please help me {a} my {t}.",
    "Steps to {a} the {t} please",
    "Need to {a} my {t} - how?",
    "Hi, how would I {a} my {t}?",
    "Quick question: can I {a} my {t}?",
)
DETAILS = (
    "on the mobile app",
    "from my laptop",
    "online",
    "today",
    "as a business customer",
    "for my team",
    "right now",
    "without calling support",
)
DETAIL_SHARE = 0.35
FAQ = "support_faq"


def group_of(intent: tuple[str, str]) -> str:
    return f"{intent[0]}/{intent[1]}"


def wording(intent: tuple[str, str], rng: random.Random) -> str:
    """One way of asking for `intent`."""
    action, thing = intent
    text = rng.choice(TEMPLATES).format(a=rng.choice(ACTIONS[action]), t=rng.choice(THINGS[thing]))
    if rng.random() < DETAIL_SHARE:
        end = text[-1] if text[-1] in "?." else ""
        text = f"{text.rstrip('?.')} {rng.choice(DETAILS)}{end}"
    return text


def near_misses_together(rng: random.Random) -> list[tuple[str, str]]:
    """INTENTS shuffled, but each thing's intents kept together: the reference's questions
    are asked with a frequency that falls with their rank, so neighbours in this list are
    asked about as often, and the frequent questions have their near-misses among the
    frequent ones."""
    things = list(dict.fromkeys(thing for _, thing in INTENTS))
    rng.shuffle(things)
    out = []
    for thing in things:
        mine = [intent for intent in INTENTS if intent[1] == thing]
        rng.shuffle(mine)
        out += mine
    return out


def derive(reference: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The paraphrase trace of a reference trace (see the module docstring)."""
    questions: list[str] = []
    for job in reference:
        if job["feature"] == FAQ:
            text = job["request"]["messages"][-1]["content"]
            if text not in questions:
                questions.append(text)
    intents = near_misses_together(random.Random(f"intents/{seed}"))
    if len(questions) > len(intents):
        raise ValueError(f"{len(questions)} FAQ questions, only {len(intents)} intents")
    meaning = dict(zip(questions, intents, strict=False))
    out = []
    for n, job in enumerate(reference):
        if job["feature"] != FAQ:
            out.append(job)
            continue
        intent = meaning[job["request"]["messages"][-1]["content"]]
        rng = random.Random(f"wording/{seed}/{n}")
        request = dict(job["request"])
        request["messages"] = [
            *request["messages"][:-1],
            {"role": "user", "content": wording(intent, rng)},
        ]
        out.append({**job, "request": request, "group": group_of(intent)})
    return out


def reference_trace(jobs: int, seed: int) -> list[dict[str, Any]]:
    """make_workload.py's trace, as it writes it."""
    script = Path(__file__).resolve().parent / "make_workload.py"
    done = subprocess.run(
        [sys.executable, str(script), "--jobs", str(jobs), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000, help="reference trace size (2000)")
    p.add_argument("--seed", type=int, default=7, help="of the reference trace and the wordings")
    p.add_argument("--from", dest="source", help="a reference trace file instead of generating")
    p.add_argument("--out", default="-")
    a = p.parse_args()
    if a.source:
        reference = [json.loads(line) for line in Path(a.source).read_text().splitlines()]
    else:
        reference = reference_trace(a.jobs, a.seed)
    trace = derive(reference, a.seed)
    lines = "".join(json.dumps(j, separators=(",", ":")) + "\n" for j in trace)
    if a.out == "-":
        sys.stdout.write(lines)
    else:
        Path(a.out).write_text(lines)


if __name__ == "__main__":
    main()

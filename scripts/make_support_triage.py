"""Generate loracast's LLM demo dataset: support messages triaged into strict JSON (chat format).

Each row is a conversation in the format TRL's SFT trainer reads (``messages``: system, user,
assistant). The user turn is a customer message to a fictional shop; the assistant turn is one
line of JSON with four fields:

    {"intent": "account|billing|delivery|technical", "urgency": "high|normal|low",
     "order_id": "6 digits" or null, "item": "the product named" or null}

Every sentence is composed here from hand-written parts, so the data carries no third-party text;
it is released under CC0-1.0. The output is deterministic for a given seed.

    python scripts/make_support_triage.py        # writes src/loracast/data/support_triage.jsonl

Held-out rows (``split`` = "test") are built from parts no "train" row uses: a quarter of the
core requests of each intent, two of the seven phrasings of high and of low urgency, two of the seven ways to write an
order number, and a quarter of the items. A score on them measures whether the model learnt the
task, not the templates.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = ('Reply with JSON only: {"intent": account|billing|delivery|technical, "urgency": high|normal|low, '
          '"order_id": string or null, "item": string or null}')

ITEMS = ["jacket", "blender", "phone case", "desk lamp", "coffee grinder", "backpack", "keyboard", "yoga mat",
         "kettle", "monitor stand", "board game", "rain coat", "toaster", "water bottle", "sofa cushion", "tent",
         "hair dryer", "office chair", "bike helmet", "wall clock"]

# How an order number appears in a message; {n} is six digits.
ORDER_FORMS = ["order {n}", "order #{n}", "order number {n}", "(order {n})", "order no. {n}", "ref {n}",
               "my order {n}"]

URGENT = {
    "high": ["This is urgent.", "I need this fixed today.", "Please treat this as urgent!", "ASAP please.",
             "It is very urgent.", "I need an answer right now.", "This cannot wait."],
    "low": ["No rush.", "Whenever you have time.", "It is not urgent.", "Take your time.",
            "No hurry at all.", "Any time this week is fine.", "Low priority."],
    "normal": [""],
}

OPENERS = ["", "", "Hi, ", "Hello, ", "Hey. ", "Good morning. ", "Hi team, ", "Hello support, "]
CLOSERS = ["", "", " Thanks.", " Thank you!", " Cheers.", " Regards, Sam."]

# Core requests with slots: {item} (a product) and {order} (an order number, as one of ORDER_FORMS).
CORES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for the {item} in {order}",
        "the refund for the {item} never reached my card",
        "I paid too much for {order}",
        "please send me an invoice for {order}",
        "my card was declined when I tried to buy a {item}",
        "why did the price of the {item} go up after I paid",
        "I want my money back for the {item}",
        "there is a fee on my statement I do not understand",
        "you billed me for express shipping on {order} but it came by normal post",
        "can I pay for the {item} in instalments",
        "the discount code did not work on {order}",
        "I got charged for {order} which I cancelled",
    ],
    "delivery": [
        "the {item} from {order} has not arrived",
        "my tracking link for {order} shows nothing",
        "the courier left my {item} at the wrong address",
        "the {item} arrived broken",
        "can I change the delivery address for {order}",
        "{order} says delivered but I have nothing",
        "the box came without the {item}",
        "my parcel is stuck at the depot",
        "I got someone else's {item} in {order}",
        "when will the {item} be delivered",
        "the driver never rang my bell",
        "can you ship {order} faster",
    ],
    "account": [
        "I cannot log in to my account",
        "please change the email address on my profile",
        "I want to delete my account",
        "my password reset email never comes",
        "someone else logged in to my account and placed {order}",
        "how do I update my phone number",
        "my account is locked after too many tries",
        "I want to merge my two accounts",
        "the name on my account is spelled wrong",
        "please unsubscribe me from your newsletter",
        "I cannot see {order} in my order history",
        "how do I turn on two-factor login",
    ],
    "technical": [
        "the app crashes when I open the page of the {item}",
        "the checkout button does nothing",
        "your website will not load on my phone",
        "the product photos of the {item} do not show",
        "the app freezes when I look at {order}",
        "I get an error when I add the {item} to my basket",
        "the search bar finds no results",
        "the page for {order} shows an error 500",
        "the app logs me out every few minutes",
        "the size chart for the {item} is blank",
        "the reviews of the {item} never load",
        "the website shows prices in the wrong currency",
    ],
}


def _held_out(values: list[str], share: float, rng: random.Random) -> set[str]:
    count = max(1, round(len(values) * share))
    return set(rng.sample(values, count))


def make_rows(seed: int, per_intent_train: int, per_intent_test: int) -> list[dict]:
    """The dataset's rows: `per_intent_*` conversations of each intent and split, train first."""
    rng = random.Random(seed)
    test_cores = {intent: _held_out(cores, 0.25, rng) for intent, cores in CORES.items()}
    test_urgency = {level: _held_out(cues, 1 / 3, rng) for level, cues in URGENT.items() if level != "normal"}
    test_forms = _held_out(ORDER_FORMS, 2 / 7, rng)
    test_items = _held_out(ITEMS, 0.25, rng)
    rows = []
    for split, per_intent in (("train", per_intent_train), ("test", per_intent_test)):
        for intent, cores in CORES.items():
            usable = [c for c in cores if (c in test_cores[intent]) == (split == "test")]
            for k in range(per_intent):
                rows.append(_row(usable[k % len(usable)], intent, split, rng, test_urgency, test_forms, test_items))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    rng.shuffle(train)
    rng.shuffle(test)
    return train + test


def _pick(values: list[str], held: set[str], split: str, rng: random.Random) -> str:
    usable = [v for v in values if (v in held) == (split == "test")] if held else values
    return rng.choice(usable)


def _row(core: str, intent: str, split: str, rng: random.Random, test_urgency: dict[str, set[str]],
         test_forms: set[str], test_items: set[str]) -> dict:
    item = _pick(ITEMS, test_items, split, rng) if "{item}" in core else None
    order_id = f"{rng.randrange(100000, 1000000)}" if "{order}" in core else None
    order_text = _pick(ORDER_FORMS, test_forms, split, rng).format(n=order_id) if order_id else ""
    if "{order}" not in core and rng.random() < 0.35:  # an order number mentioned in passing
        order_id = f"{rng.randrange(100000, 1000000)}"
        core = core + ", about {order}"
        order_text = _pick(ORDER_FORMS, test_forms, split, rng).format(n=order_id)
    urgency = rng.choice(["high", "normal", "normal", "low"])
    cue = _pick(URGENT[urgency], test_urgency.get(urgency, set()), split, rng)
    body = core.format(item=item or "", order=order_text)
    opener = rng.choice(OPENERS)
    body = body[0].upper() + body[1:] if not opener or opener.endswith(". ") else body
    question = core.split()[0] in ("can", "why", "how", "when")
    sentence = f"{opener}{body}{'?' if question else rng.choice(['.', '.', '!'])}"
    parts = [sentence, cue] if rng.random() < 0.6 else [cue, sentence[0].upper() + sentence[1:]]
    message = " ".join(p for p in parts if p) + rng.choice(CLOSERS)
    answer = json.dumps({"intent": intent, "urgency": urgency, "order_id": order_id, "item": item})
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message},
                         {"role": "assistant", "content": answer}], "split": split}


def main() -> None:
    """Write the dataset (deterministic for a given seed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--train-per-intent", type=int, default=200)
    parser.add_argument("--test-per-intent", type=int, default=40)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "src/loracast/data/support_triage.jsonl")
    args = parser.parse_args()
    rows = make_rows(args.seed, args.train_per_intent, args.test_per_intent)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()

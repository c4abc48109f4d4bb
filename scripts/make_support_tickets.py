"""Generate loracast's demo dataset: short customer-support messages labelled by intent.

Every sentence is composed here from hand-written parts (an opener, a core request with slots,
a closer), so the data carries no third-party text; it is released under CC0-1.0. The output
is deterministic for a given seed: rerunning this script rewrites the same file.

    python scripts/make_support_tickets.py            # writes src/loracast/data/support_tickets.jsonl

Four intents, the same number of messages each. Each message carries a ``split`` field: the
"test" messages are built from core requests that no "train" message uses (4 of the 20 per
intent), so evaluation measures whether the model generalises to new phrasings rather than
whether it memorised the templates. Some messages mention words of another intent (a refund for
a late parcel is billing; a password reset link that opens a blank page is technical), so the
task needs more than keyword spotting.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ITEMS = ["jacket", "blender", "phone case", "pair of boots", "desk lamp", "coffee grinder", "backpack",
         "keyboard", "yoga mat", "set of plates", "rain coat", "kettle", "monitor stand", "board game"]
DAYS = ["two", "three", "four", "five", "six", "ten", "twelve"]
AMOUNTS = ["$12", "$19.99", "$35", "$48.50", "$60", "$7.25", "$120", "$89"]
DEVICES = ["my iPhone", "my Android phone", "my laptop", "the tablet app", "Chrome", "Firefox", "Safari"]

OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hey there. ", "Good morning. ", "Quick question: ", "Urgent: ",
           "Sorry to bother you, ", "Hi team, ", "Hello support, "]
CLOSERS = ["", "", "", " Thanks.", " Thank you!", " Please help.", " What should I do?", " Can you fix this?",
           " This is really frustrating.", " Any update would be great.", " Cheers."]

CORES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {item}",
        "my card was billed {amount} but the order total was lower",
        "I still have not received the refund for the {item} I returned",
        "can I get an invoice for my last order",
        "the discount code did not apply and I paid {amount} too much",
        "why is there a {amount} fee on my statement",
        "my payment keeps getting declined at checkout",
        "please cancel my subscription before the next charge",
        "I want my money back for the {item}",
        "the price of the {item} changed after I paid",
        "you took {amount} from my account without asking",
        "can I pay for the {item} in instalments",
        "the refund went to an old card that is closed",
        "I need a receipt with my company name for the {item}",
        "my parcel arrived {days} days late, can I get the shipping fee refunded",
        "I was billed for express delivery but it came by normal post",
        "how do I change the card you charge every month",
        "the gift card balance was not taken off my total",
        "I got charged {amount} for an order I cancelled",
        "do you offer a price match on the {item}",
    ],
    "delivery": [
        "my {item} has not arrived after {days} days",
        "the tracking number for my {item} does not work",
        "the courier left my parcel at the wrong address",
        "can I change the delivery address for my order",
        "the box with my {item} arrived crushed",
        "the tracking page says delivered but nothing is here",
        "when will my {item} be shipped",
        "can I pick up the {item} from a store instead",
        "my order was split and only half of it came",
        "do you deliver to another country",
        "the delivery driver never rang the bell",
        "the {item} has been stuck in customs for {days} days",
        "I need the {item} before Friday, can you send it faster",
        "the parcel was returned to you by mistake",
        "I received someone else's {item} in my package",
        "can the courier leave the parcel with my neighbour",
        "the estimated delivery date keeps moving",
        "the app says my {item} shipped but the tracking has no updates",
        "I paid for next-day delivery and it has been {days} days",
        "a part of the {item} was missing from the box",
    ],
    "technical": [
        "the app crashes every time I open my orders on {device}",
        "the checkout button does nothing on {device}",
        "I get an error 500 when I try to pay",
        "the website is extremely slow on {device}",
        "pictures of the {item} do not load",
        "the search bar returns no results for anything",
        "the app logs me out every few minutes on {device}",
        "the page freezes when I add the {item} to my cart",
        "notifications stopped working on {device}",
        "the password reset link opens a blank page",
        "the site shows a security warning in {device}",
        "my cart empties itself when I refresh the page",
        "the size chart for the {item} is broken on {device}",
        "the app will not install on {device}",
        "I tap pay and the spinner never stops",
        "the refund form gives an error when I submit it",
        "videos of the {item} keep buffering on {device}",
        "the tracking page crashes on {device}",
        "dark mode makes the text unreadable on {device}",
        "the app shows the wrong prices until I restart it",
    ],
    "account": [
        "how do I change the email on my account",
        "I forgot my password and need to reset it",
        "please delete my account and all my data",
        "someone else logged into my account",
        "how can I update my phone number",
        "I want to merge my two accounts",
        "can I change my username",
        "my account was locked after too many attempts",
        "how do I turn on two-factor login",
        "I no longer have access to the email on my account",
        "please stop sending me marketing emails",
        "how do I download a copy of my personal data",
        "I want to change the default address in my profile",
        "can I add my partner to my account",
        "my loyalty points disappeared from my profile",
        "I signed up twice by mistake, please remove one account",
        "how do I change my name on the account",
        "I did not create this account, please close it",
        "where do I see the devices logged into my account",
        "I want to unsubscribe from the newsletter but keep my account",
    ],
}


def fill(template: str, rng: random.Random) -> str:
    """One core sentence with its slots filled at random."""
    return template.format(item=rng.choice(ITEMS), days=rng.choice(DAYS), amount=rng.choice(AMOUNTS),
                           device=rng.choice(DEVICES))


def message(core: str, rng: random.Random) -> str:
    """A full message: opener, core (capitalised where it starts the text), closer, end mark."""
    opener = rng.choice(OPENERS)
    if not opener or opener.endswith((". ", ": ")):
        core = core[0].upper() + core[1:]
    mark = "?" if core.split()[0].lower() in {"how", "can", "why", "when", "where", "do"} else rng.choice(".!.")
    return f"{opener}{core}{mark}{rng.choice(CLOSERS)}".strip()


TEST_CORES = 4  # core requests per intent kept out of training


def generate(per_label: int, test_per_label: int, seed: int) -> list[dict[str, str]]:
    """Distinct messages per intent (`per_label` train, `test_per_label` test), shuffled together."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for label, cores in CORES.items():
        cores = list(cores)
        rng.shuffle(cores)
        for split, pool, count in (("train", cores[TEST_CORES:], per_label),
                                   ("test", cores[:TEST_CORES], test_per_label)):
            made = 0
            while made < count:
                text = message(fill(rng.choice(pool), rng), rng)
                if text not in seen:
                    seen.add(text)
                    rows.append({"text": text, "label": label, "split": split})
                    made += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=240, help="train messages per intent")
    parser.add_argument("--test-per-label", type=int, default=60, help="test messages per intent")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "src/loracast/data/support_tickets.jsonl")
    args = parser.parse_args()
    rows = generate(args.per_label, args.test_per_label, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} messages to {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Derive the AdapterFusion walkthrough's two extra tasks from the sentiment data.

Standard library only; deterministic. Writes, beside this file:

  topic.jsonl, topic_eval.jsonl          label 1 when the text is about entertainment (a story,
                                         book, concert, show, movie, game or song), 0 when it is
                                         about everyday things (a meal, class, room, trip,
                                         service, hotel, park, phone, coffee or app)
  recommend.jsonl, recommend_eval.jsonl  label 1 for a positive text about entertainment: the
                                         conjunction of the sentiment and topic tasks, which
                                         the fusion of their two adapters learns

Texts naming both kinds of subject, or neither, are left out.

Usage: python3 examples/data/make_fusion_tasks.py
"""

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENTERTAINMENT = {"story", "book", "concert", "show", "movie", "game", "song"}
EVERYDAY = {"meal", "class", "room", "trip", "service", "hotel", "park", "phone", "coffee", "app"}


def main() -> None:
    for source, suffix in [("sentiment", ""), ("sentiment_eval", "_eval")]:
        topic, recommend = [], []
        for line in (HERE / f"{source}.jsonl").read_text().splitlines():
            row = json.loads(line)
            words = set(re.findall(r"[a-z]+", row["text"].lower()))
            entertainment, everyday = bool(words & ENTERTAINMENT), bool(words & EVERYDAY)
            if entertainment == everyday:
                continue
            topic.append({"text": row["text"], "label": int(entertainment)})
            recommend.append({"text": row["text"], "label": int(entertainment and row["label"] == 1)})
        for name, rows in [("topic", topic), ("recommend", recommend)]:
            path = HERE / f"{name}{suffix}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"{path.name}: {len(rows)} examples, {sum(r['label'] for r in rows)} labelled 1")


if __name__ == "__main__":
    main()

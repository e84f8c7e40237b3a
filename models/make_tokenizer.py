"""Trains the two tiny tokenizers shipped for the fixtures, on the example data in examples/data.

The fixtures have a vocabulary of 128 ids, so every id these tokenizers produce is below 128:

- tokenizers/bert/tokenizer.json: WordPiece, lower-cased, BERT normalization and pre-tokenization
  (each CJK character is its own word); [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; the
  post-processor wraps one text as "[CLS] A [SEP]" and a pair as "[CLS] A [SEP] B [SEP]" with
  token type ids 0 then 1.
- tokenizers/causal/tokenizer.json: BPE over characters (no byte fallback: 256 byte tokens would
  not fit), NFKC and lower-cased, "▁" for spaces as in sentencepiece; <pad>=0, <s>=1, </s>=2,
  <unk>=3, matching the LLaMA and GPT-2 fixtures (bos 1, eos 2); the post-processor puts <s> in
  front. The alphabet keeps the 64 most frequent characters, which include the most frequent
  Chinese ones; the other Chinese characters become <unk>.

The instruction data is also fed through the prompt template of `graft train`
(core/src/train/text.rs), so that the template's words get tokens of their own.

The output does not change from run to run: the trainers of the tokenizers library break ties
between equally frequent characters through randomly seeded hash maps, so the alphabet is chosen
here (most frequent first, ties by code point) and passed as the whole initial alphabet, and the
WordPiece vocabulary, whose ids do not affect encoding, is renumbered in a fixed order.

Run from the repository root: /path/to/python models/make_tokenizer.py
"""

import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
OUT = ROOT / "models" / "tokenizers"
VOCAB = 128


def prompt(row: dict) -> str:
    """The prompt template of core/src/train/text.rs (`instruction_prompt`)."""
    if row.get("input"):
        return f"Instruction: {row['instruction']}\nInput: {row['input']}\nResponse:\n"
    return f"Instruction: {row['instruction']}\nResponse:\n"


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def english_texts() -> list[str]:
    texts = [row["text"] for row in jsonl("sentiment.jsonl")]
    texts += (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines()
    texts += [prompt(row) + row["output"] for row in jsonl("instructions.jsonl")]
    return texts


def all_texts() -> list[str]:
    return english_texts() + [prompt(row) + row["output"] for row in jsonl("instructions_zh.jsonl")]


def alphabet(tokenizer: Tokenizer, texts: list[str], size: int) -> list[str]:
    """The `size` most frequent characters of `texts` as the tokenizer splits them into words."""
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            counts.update(word)
    return [c for c, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]]


def renumbered(tokenizer: Tokenizer, special: list[str]) -> Tokenizer:
    """The tokenizer with its vocabulary ids renumbered: special tokens first, as given, then
    characters, then continuation pieces, then longer tokens, each group in string order."""
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    rest = sorted((t for t in vocab if t not in special), key=lambda t: (t.startswith("##"), len(t), t))
    data["model"]["vocab"] = {token: index for index, token in enumerate(special + rest)}
    return Tokenizer.from_str(json.dumps(data))


def bert() -> Tokenizer:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    characters = alphabet(tokenizer, english_texts(), 32)
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB,
        special_tokens=special,
        initial_alphabet=characters,
        limit_alphabet=len(characters),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(english_texts(), trainer)
    tokenizer = renumbered(tokenizer, special)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def causal() -> Tokenizer:
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    characters = alphabet(tokenizer, all_texts(), 64)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=special,
        initial_alphabet=characters,
        limit_alphabet=len(characters),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(all_texts(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def check(tokenizer: Tokenizer, name: str, expected: dict[str, int], texts: list[str]) -> None:
    for token, token_id in expected.items():
        assert tokenizer.token_to_id(token) == token_id, f"{name}: {token} is not id {token_id}"
    assert tokenizer.get_vocab_size() <= VOCAB, f"{name}: vocabulary of {tokenizer.get_vocab_size()}"
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert max(ids) < VOCAB, f"{name}: id {max(ids)} for {text!r}"


def main() -> None:
    tokenizers = {
        "bert": (bert(), {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}, english_texts()),
        "causal": (causal(), {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, all_texts()),
    }
    for name, (tokenizer, expected, texts) in tokenizers.items():
        check(tokenizer, name, expected, texts)
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
        lengths = [len(tokenizer.encode(text).ids) for text in texts]
        print(
            f"{folder / 'tokenizer.json'}: {tokenizer.get_vocab_size()} tokens; "
            f"{len(texts)} texts, longest {max(lengths)} tokens, mean {sum(lengths) / len(lengths):.1f}"
        )


if __name__ == "__main__":
    main()

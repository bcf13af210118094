"""Records into token sequences: masked examples, general-text chunks, the train/val split,
and the collator that pads them into batches.

A record is a dict with either `messages` (a chat: a list of {role, content}) or `prompt` and
`completion`. Loss is taken only on what the model should learn to write: assistant turns, or
the completion. Every failure on bad input is a one-line UsageError naming the file and record.
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

import torch

from workbench.data.sources import read_records
from workbench.errors import UsageError, first_line
from workbench.io import fingerprint
from workbench.scoring.masks import IGNORE, pad_rows

if TYPE_CHECKING:
    from workbench.config.recipe import DataSection

FORMATS = ("auto", "messages", "prompt_completion")


# ---------------------------------------------------------------- formatting


def _field(record: dict, name: str, where: str, kind: type = str):
    if name not in record:
        raise UsageError(f"{where}: missing field '{name}' (has: {', '.join(map(str, record)) or 'nothing'})")
    value = record[name]
    if not isinstance(value, kind):
        raise UsageError(f"{where}: field '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def text_ids(tokenizer, text: str) -> list[int]:
    # verbose=False: long general-text documents are chunked later, the length warning is noise.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def leading_bos(tokenizer) -> list[int]:
    """[bos] for a tokenizer that starts every encoding with it (Gemma: `modeling.load` sets
    `add_bos_token` where its encodings do), else []: what every sequence the model reads starts with."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []


def _prompt_completion(record: dict, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + completion + eos, loss on the completion and eos."""
    # Tokenised separately and concatenated so the prompt/completion boundary is exact.
    prompt = leading_bos(tokenizer) + text_ids(tokenizer, _field(record, "prompt", where))
    completion = text_ids(tokenizer, _field(record, "completion", where)) + [tokenizer.eos_token_id]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _is_message(message) -> bool:
    return isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))


def _checked_messages(record: dict, where: str) -> list[dict]:
    messages = _field(record, "messages", where, list)
    for i, message in enumerate(messages):
        if not _is_message(message):
            raise UsageError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    return messages


def render_chat(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> list[int]:
    try:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt)
    except Exception as exc:  # template errors are Jinja/ValueError/TypeError depending on the model
        raise UsageError(f"{where}: chat template failed: {first_line(exc)}") from None
    return list(encoded["input_ids"])


def _assistant_span(tokenizer, span: list[int]) -> int:
    """How many tokens of an assistant turn's rendering to learn: up to its last special token.

    The rendering is content + end-of-turn + template filler (ChatML's trailing newline); the
    end-of-turn token is the last special one, and what follows it is not the model's to write.
    """
    specials = set(tokenizer.all_special_ids)
    ends = [j for j, token in enumerate(span) if token in specials]
    return ends[-1] + 1 if ends else len(span)


def _messages(record: dict, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a chat, loss on each assistant turn's content and end token.

    Each assistant turn i is located by rendering messages[:i] with a generation prompt and
    messages[:i+1]; their length difference is the turn. This works for any template that
    renders prefixes consistently, which is checked rather than assumed.
    """
    messages = _checked_messages(record, where)
    full = render_chat(tokenizer, messages, where)
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], where, generation_prompt=True)
        upto = render_chat(tokenizer, messages[:i + 1], where)
        if upto[:len(before)] != before or full[:len(upto)] != upto:
            raise UsageError(f"{where}: the chat template does not render conversation prefixes "
                             "consistently, so assistant turns cannot be located")
        end = len(before) + _assistant_span(tokenizer, upto[len(before):])
        labels[len(before):end] = full[len(before):end]
    return full, labels


def format_example(record: dict, tokenizer, fmt: str, max_length: int, where: str) -> dict:
    """One record as {input_ids, attention_mask, labels, truncated}, all lists of length <= max_length.

    labels are input_ids with -100 where no loss is taken. `where` names the record in errors.
    """
    if fmt not in FORMATS:
        raise UsageError(f"{where}: unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt == "auto" and "messages" not in record and "prompt" not in record:
        raise UsageError(f"{where}: expected a 'messages' field or 'prompt' and 'completion' fields "
                         f"(has: {', '.join(map(str, record)) or 'nothing'})")
    chat = fmt == "messages" or (fmt == "auto" and "messages" in record)
    ids, labels = (_messages if chat else _prompt_completion)(record, tokenizer, where)
    # Keep the left part: the prompt must survive for the completion to mean anything.
    ids, labels, truncated = ids[:max_length], labels[:max_length], len(ids) > max_length
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": truncated}


# ---------------------------------------------------------------- general text


def _record_text(record: dict, tokenizer, where: str) -> str:
    if "text" in record:
        return _field(record, "text", where)
    if "messages" in record:
        return tokenizer.apply_chat_template(_checked_messages(record, where), tokenize=False)
    return _field(record, "prompt", where) + _field(record, "completion", where)


def _token_stream(source: str, tokenizer) -> list[int]:
    """Every record's text tokenised, each followed by eos so documents do not run together."""
    stream: list[int] = []
    for i, record in enumerate(read_records(source), start=1):
        stream += text_ids(tokenizer, _record_text(record, tokenizer, f"{source} record {i}"))
        stream.append(tokenizer.eos_token_id)
    return stream


def general_text_examples(source: str, tokenizer, max_length: int, num_examples: int,
                          seed: int = 0) -> list[dict]:
    """`num_examples` chunks of exactly `max_length` tokens of general text, labels == input_ids.

    Chunks are non-overlapping cuts of the whole token stream, taken in an order shuffled by
    `seed`. If more are asked for than the text holds, the shuffled order repeats. For a model
    that reads <bos> first (Gemma), each chunk starts with it, then max_length - 1 tokens of text:
    Gemma 3 270M read Python documentation at 4.3-5.2 nats a token without it, 2.9-3.3 with it.
    """
    bos = leading_bos(tokenizer)
    stream, size = _token_stream(source, tokenizer), max_length - len(bos)
    chunks = [bos + stream[i:i + size] for i in range(0, len(stream) - size + 1, size)]
    if not chunks:
        raise UsageError(f"{source}: only {len(stream)} tokens of text, fewer than max_length={max_length}")
    random.Random(seed).shuffle(chunks)
    return [{"input_ids": list(c), "attention_mask": [1] * len(c), "labels": list(c)}
            for c in itertools.islice(itertools.cycle(chunks), num_examples)]


# ---------------------------------------------------------------- datasets


class TrainData(NamedTuple):
    train: list[dict]
    val: list[dict]
    stats: dict


def _split(records: list[dict], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) record indices: a seeded shuffle, with at least one val record if fraction > 0."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(round(len(records) * fraction), 1 if fraction > 0 else 0)
    n_val = min(n_val, len(records) - 1)  # never the whole file: training needs an example
    return order[n_val:], order[:n_val]


def _format_all(records: list[dict], indices: Iterable[int], data: "DataSection", tokenizer,
                name: str, counts: dict) -> list[dict]:
    """Format records[indices], dropping those with no label left; counts truncated and dropped."""
    examples = []
    for i in indices:
        where = f"{name} record {i + 1}"
        example = format_example(records[i], tokenizer, data.format, data.max_length, where)
        counts["n_truncated"] += example["truncated"]
        if all(label == IGNORE for label in example["labels"]):
            counts["n_dropped_all_masked"] += 1
        else:
            examples.append(example)
    return examples


# data.self_distill: (train records, their names in errors) -> each record as the base rewrote it, or
# None for one that leaves the training set
Rewrite = Callable[[list[dict], list[str]], list["dict | None"]]


def task_splits(data: "DataSection", tokenizer, seed: int, counts: dict | None = None,
                rewrite: Rewrite | None = None) -> tuple[list[dict], list[dict]]:
    """(train, val) task examples exactly as training sees them, without replay; `rewrite`
    replaces the training records before they are formatted (validation keeps its own)."""
    counts = {"n_truncated": 0, "n_dropped_all_masked": 0} if counts is None else counts
    records = read_records(data.train)
    if data.val:
        val_records = read_records(data.val)
        n_val = min(len(val_records), data.max_val_examples or len(val_records))
        val = _format_all(val_records, range(n_val), data, tokenizer, data.val, counts)
        train_idx = list(range(len(records)))
    else:
        train_idx, val_idx = _split(records, data.val_fraction, seed)
        val_idx = val_idx[:data.max_val_examples]
        val = _format_all(records, val_idx, data, tokenizer, data.train, counts)
    train_idx = train_idx[:data.max_examples]
    if data.self_distill is not None and data.format == "auto":  # before a model loads
        chat = next((i for i in train_idx if "messages" in records[i]), None)
        if chat is not None:
            raise UsageError(f"{data.train} record {chat + 1}: data.self_distill rewrites a completion, and "
                             "this record is a chat (messages); give prompt/completion records")
    if rewrite is not None:
        names = [f"{data.train} record {i + 1}" for i in train_idx]
        records = list(records)
        for i, record in zip(train_idx, rewrite([records[i] for i in train_idx], names)):
            records[i] = record
        train_idx = [i for i in train_idx if records[i] is not None]
    train = _format_all(records, train_idx, data, tokenizer, data.train, counts)
    if not train:
        raise UsageError(f"{data.train}: no training examples left: all {len(train_idx)} have nothing to "
                         f"learn (completion truncated away at max_length={data.max_length}, "
                         "or no assistant turn)")
    return train, val


def build_datasets(data: "DataSection", tokenizer, seed: int, rewrite: Rewrite | None = None) -> TrainData:
    """Train and val examples for a recipe's data section, plus stats for the run record.

    stats: n_train is the final mix (task + n_replay); n_truncated and n_dropped_all_masked count
    all task examples (train and val); n_completion_tokens the loss-carrying tokens of task train.
    """
    counts = {"n_truncated": 0, "n_dropped_all_masked": 0}
    train, val = task_splits(data, tokenizer, seed, counts, rewrite)
    n_completion = sum(label != IGNORE for ex in train for label in ex["labels"])
    replay = []
    if data.replay is not None:
        n_replay = round(data.replay.ratio / (1 - data.replay.ratio) * len(train))
        replay = general_text_examples(data.replay.source, tokenizer, data.max_length, n_replay, seed)
        train = train + replay
        random.Random(seed).shuffle(train)
    stats = {"n_train": len(train), "n_val": len(val), "n_replay": len(replay), **counts,
             "n_completion_tokens": n_completion, "max_length": data.max_length}
    return TrainData(train, val, stats)


def data_fingerprint(examples: list[dict]) -> str:
    """A stable hash of the examples' token ids and labels (what the model is trained on)."""
    return fingerprint([[ex["input_ids"], ex["labels"]] for ex in examples])


EXAMPLE_INDEX = "index"  # an example's position in the training set, where a penalty needs it
EXAMPLE_WEIGHT = "example_weight"  # a weight on the example's task loss (train.example_weights)
NOT_MODEL_INPUTS = (EXAMPLE_INDEX, EXAMPLE_WEIGHT)  # batch keys the trainer keeps from the model's forward


class Collator:
    """Right-pads a batch to its longest example: input_ids with pad, attention_mask 0, labels -100.
    An example's `index` and `example_weight`, when it has them, are passed through as [batch] tensors."""

    def __init__(self, pad_token_id: int):
        self.pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """features: dicts of equal-length lists; returns LongTensors of shape (batch, longest)."""
        batch = {key: pad_rows([f[key] for f in features], pad)[0] for key, pad in self.pads.items()}
        if EXAMPLE_INDEX in features[0]:
            batch[EXAMPLE_INDEX] = torch.tensor([f[EXAMPLE_INDEX] for f in features], dtype=torch.long)
        if EXAMPLE_WEIGHT in features[0]:
            batch[EXAMPLE_WEIGHT] = torch.tensor([f[EXAMPLE_WEIGHT] for f in features], dtype=torch.float32)
        return batch

"""Seeded mutation fuzzing of the model loaders (issue 11, item 8).

A tiny valid GGUF and a tiny valid HF directory (tests/test_loader_hardening.py writes both) are
mutated case by case with random.Random(seed): header fields rewritten with boundary values (counts,
string lengths, value types, dimensions, tensor types and offsets, model hyper-parameters), bytes
flipped, inserted, deleted or cut off; config.json values replaced by other JSON types and sizes;
safetensors header entries given other dtypes, shapes, offsets and names, the header length forged.

Every case runs `load_model` in this process under a SIGALRM bound and must end in one of two ways:
a one-line ModelLoadError, or (when the mutation happened to be harmless) a model that runs a
forward step and encodes text. Anything else -- another exception type, a hang past the bound --
fails the case; its id is the seed, so `-k "gguf and 17"` replays it.
"""

from __future__ import annotations

import collections
import json
import random
import re
import signal
import struct
from pathlib import Path

import pytest

from mojollm.engine.step import StepBatch
from mojollm.errors import ModelLoadError
from mojollm.models import load_model
from test_loader_hardening import write_tiny_gguf, write_tiny_hf

GGUF_CASES = 4000
HF_CASES = 4000
BOUND_S = 5  # a tiny model loads in ~30 ms; anything near this is a hang

# Boundary values by field width; mutations also derive values from the field's own.
INTERESTING = {
    4: [0, 1, 2, 3, 7, 8, 9, 12, 13, 30, 31, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1],
    8: [0, 1, 2, 7, 8, 64, 2**31, 2**32, 2**32 + 1, 2**62, 2**63, 2**64 - 1],
}
JSON_VALUES = [None, 0, 1, 2, 3, -1, 15, 17, 2**31, 2**63, 10**9, 3_600_000_000, 0.5, 32.0, 1e308, -1e-5,
               float("nan"), float("inf"), "", "32", "silu", "llama3", True, False, [], [32], [1, "2"], {},
               {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "linear", "factor": 0}, ["LlamaForCausalLM"],
               ["Qwen2ForCausalLM"], ["MistralForCausalLM"]]
EXTRA_CONFIG_KEYS = ["head_dim", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
                     "attention_bias", "hidden_act", "tie_word_embeddings"]


OUTCOMES = collections.Counter()  # refused / loaded, for test_outcomes_are_mixed
REASONS: set[str] = set()  # the refusals' messages, numbers and paths blanked
DONE: set[tuple[str, int]] = set()  # the cases run in this session


class LoaderHang(BaseException):
    """Raised by SIGALRM; a BaseException so no `except Exception` in the code under test hides it."""


# ---- an independent map of a GGUF header (the fuzzer must not trust the parser it tests) ----

_SCALAR_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(data: bytes) -> tuple[list[tuple[int, int, str, str]], int]:
    """(offset, width, kind, key or tensor name) of every field of a valid GGUF header, and the
    offset where the tensor data starts."""
    fields, pos = [], 4

    def take(width, kind, owner=""):
        nonlocal pos
        fields.append((pos, width, kind, owner))
        value = int.from_bytes(data[pos:pos + width], "little")
        pos += width
        return value

    def string(kind, owner=""):
        nonlocal pos
        n = take(8, kind, owner)
        text = data[pos:pos + n].decode()
        pos += n
        return text

    take(4, "version")
    n_tensors, n_kv = take(8, "tensor_count"), take(8, "kv_count")
    for _ in range(n_kv):
        key = string("key_length")
        vtype = take(4, "value_type", key)
        if vtype == 8:
            string("string_length", key)
        elif vtype == 9:
            itype, count = take(4, "array_type", key), take(8, "array_length", key)
            for _ in range(count):
                if itype == 8:
                    string("string_length", key)
                else:
                    take(_SCALAR_WIDTH[itype], "array_item", key)
        else:
            take(_SCALAR_WIDTH[vtype], "scalar", key)
    for _ in range(n_tensors):
        name = string("name_length")
        n_dims = take(4, "n_dims", name)
        for _ in range(n_dims):
            take(8, "dim", name)
        take(4, "tensor_type", name)
        take(8, "tensor_offset", name)
    return fields, -(-pos // 32) * 32


def _boundary(rng: random.Random, width: int, old: int) -> int:
    top = 2 ** (8 * width) - 1
    derived = [old + 1, old - 1, old * 2, old // 2, old + 32, top - old]
    return rng.choice(INTERESTING.get(width, [0, 1, top]) + derived) & top


def mutate_gguf(data: bytes, fields: list, data_start: int, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of a valid GGUF; returns the bytes and a description."""
    out = bytearray(data)
    op = rng.choices(["field", "hyper", "string_or_count", "flip", "splice", "truncate"],
                     weights=[30, 15, 15, 20, 10, 10])[0]
    if op in ("field", "hyper", "string_or_count"):
        if op == "hyper":  # a model hyper-parameter: these size everything the loader builds
            pool = [f for f in fields if f[2] == "scalar" and f[3].startswith("llama.")]
        elif op == "string_or_count":
            pool = [f for f in fields if f[2] in ("string_length", "array_length", "key_length", "name_length",
                                                  "tensor_count", "kv_count")]
        else:
            pool = [f for f in fields if f[2] != "string_length" or rng.random() < 0.05]  # not mostly tokens
        offset, width, kind, owner = rng.choice(pool)
        old = int.from_bytes(out[offset:offset + width], "little")
        if kind == "scalar" and width == 4 and rng.random() < 0.3:  # a float32 field: special floats
            new_bytes = struct.pack("<f", rng.choice([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 0.5]))
            out[offset:offset + 4] = new_bytes
            return bytes(out), f"{kind} of {owner} at {offset} := float {struct.unpack('<f', new_bytes)[0]}"
        new = _boundary(rng, width, old)
        out[offset:offset + width] = new.to_bytes(width, "little")
        return bytes(out), f"{kind} of {owner or '-'} at {offset}: {old} -> {new}"
    if op == "flip":
        spots = sorted(rng.randrange(data_start) for _ in range(rng.randint(1, 6)))
        for at in spots:
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out), f"bits flipped at {spots}"
    if op == "splice":
        at = rng.randrange(4, data_start)
        n = rng.randint(1, 16)
        if rng.random() < 0.5:
            del out[at:at + n]
            return bytes(out), f"{n} bytes deleted at {at}"
        out[at:at] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(out), f"{n} bytes inserted at {at}"
    at = rng.randrange(data_start + 64) if rng.random() < 0.7 else rng.randrange(len(out))
    return bytes(out[:at]), f"cut at {at} of {len(out)}"


# ---- HF directory mutations ----

def mutate_config(cfg: dict, rng: random.Random) -> tuple[bytes, str]:
    cfg = json.loads(json.dumps(cfg))
    op = rng.choices(["value", "drop", "text"], weights=[70, 10, 20])[0]
    if op == "value":
        key = rng.choice(sorted(cfg) + EXTRA_CONFIG_KEYS)
        value = rng.choice(JSON_VALUES)
        cfg[key] = value
        return json.dumps(cfg).encode(), f"config {key} := {value!r}"
    if op == "drop":
        key = rng.choice(sorted(cfg))
        del cfg[key]
        return json.dumps(cfg).encode(), f"config {key} removed"
    text = bytearray(json.dumps(cfg).encode())
    if rng.random() < 0.5:
        at = rng.randrange(len(text))
        return bytes(text[:at]), f"config.json cut at {at}"
    for _ in range(rng.randint(1, 4)):
        text[rng.randrange(len(text))] = rng.randrange(256)
    return bytes(text), "config.json bytes replaced"


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    op = rng.choices(["dtype", "shape", "offsets", "entry", "name", "header_length", "header_bytes", "truncate"],
                     weights=[12, 18, 22, 10, 13, 10, 8, 7])[0]
    name = rng.choice(names)
    entry = header[name]
    if op == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", None, 4, ["F32"]])
        what = f"{name} dtype := {entry['dtype']!r}"
    elif op == "shape":
        shape = list(entry["shape"])
        choice = rng.randrange(6)
        if choice == 0:
            shape.append(rng.choice([1, 2]))
        elif choice == 1 and shape:
            shape.pop()
        elif choice == 2 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, -1, 1, 2**32, 2**62, "3", 1.5, True, None])
        elif choice == 3:
            shape = shape[::-1]
        elif choice == 4:
            shape = rng.choice([[], None, "2x2", {}, [[2]]])
        else:
            shape = [d * 2 if isinstance(d, int) else d for d in shape] if isinstance(shape, list) else shape
        entry["shape"] = shape
        what = f"{name} shape := {shape!r}"
    elif op == "offsets":
        begin, end = entry["data_offsets"]
        choice = rng.randrange(6)
        delta = rng.choice([1, 2, 4, 64, 1024, len(body), 2**62])
        offsets = [[begin + delta, end + delta], [begin - delta, end - delta], [end, begin], [begin, end + delta],
                   [0, end - begin], rng.choice([[begin], [begin, end, end], None, ["0", "1"], [begin, 1.5]])][choice]
        entry["data_offsets"] = offsets
        what = f"{name} data_offsets := {offsets!r}"
    elif op == "entry":
        choice = rng.randrange(4)
        if choice == 0:
            header[name] = rng.choice(["F32", 7, None, [1, 2], True])
        else:
            del entry[["dtype", "shape", "data_offsets"][choice - 1]]
        what = f"{name} entry damaged ({choice})"
    elif op == "name":
        new = rng.choice(["model.layers.7.mlp.up_proj.weight", "model.layers.01.mlp.up_proj.weight",
                          "model.layers.-1.mlp.up_proj.weight", "model.layers.\u0661.mlp.up_proj.weight",
                          "model.rotary_emb.inv_freq", "transformer.h.0.attn.weight", "", "__metadata__",
                          rng.choice(names)])
        copy = rng.random() < 0.5  # a copy keeps the original: two names share (overlapping) bytes
        header[new] = header[name] if copy else header.pop(name)
        what = f"{name} {'copied' if copy else 'renamed'} to {new!r}"
    raw = json.dumps(header).encode()
    out = struct.pack("<Q", len(raw)) + raw + body
    if op == "header_length":
        n = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, len(out), len(out) - 7, 2**31, 2**63, 2**64 - 1])
        return struct.pack("<Q", n) + out[8:], f"header length := {n}"
    if op == "header_bytes":
        flipped = bytearray(out)
        for _ in range(rng.randint(1, 4)):
            flipped[8 + rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(flipped), "header bytes replaced"
    if op == "truncate":
        at = rng.randrange(len(out))
        return out[:at], f"cut at {at} of {len(out)}"
    return out, what


# ---- running one case ----

def _on_alarm(signum, frame):
    raise LoaderHang(f"the load did not finish within {BOUND_S} s")


def load_or_refuse(path: Path, backend, what: str) -> None:
    """load_model under the time bound: a one-line ModelLoadError, or a model that works."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, BOUND_S)
    try:
        try:
            model = load_model(path, backend)
        except ModelLoadError as e:
            message = str(e)
            assert len(message.splitlines()) == 1, f"{what}: not one line: {message!r}"
            OUTCOMES["refused"] += 1
            reason = message.replace(str(path), "PATH").replace(" is not a valid GGUF file (truncated or corrupt?)", "")
            REASONS.add(re.sub(r"\d+", "N", reason)[:60])
            return
        # The mutation was harmless: the model must still run and tokenize.
        model.allocate_kv_cache(2, 16)
        ids = [i % model.config.vocab_size for i in (0, 5, 9, 17)][:model.max_positions]
        logits = model.forward(StepBatch.single_sequence(ids, 0, [1, 0], 16))
        assert logits.shape == (1, model.config.vocab_size), what
        # (not decode: tokenizer.py's vocab_size undercounts a vocabulary with repeated spellings)
        assert max(model.tokenizer.encode("the cat")) < model.config.vocab_size, what
        OUTCOMES["loaded"] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("fuzz-gguf-seed") / "tiny.gguf")
    data = path.read_bytes()
    fields, data_start = gguf_fields(data)
    return data, fields, data_start, tmp_path_factory.mktemp("fuzz-gguf") / "case.gguf"


@pytest.fixture(scope="module")
def hf_seed(tmp_path_factory):
    path = write_tiny_hf(tmp_path_factory.mktemp("fuzz-hf") / "case")
    return path, json.loads((path / "config.json").read_text()), (path / "model.safetensors").read_bytes()


def _stacked(rng: random.Random) -> int:
    """How many mutations one case applies: mostly one, sometimes a few on top of each other."""
    return rng.choice([1, 1, 1, 2, 3])


@pytest.mark.parametrize("seed", range(GGUF_CASES))
def test_fuzz_gguf(gguf_seed, cpu_backend, seed):
    _gguf_case(gguf_seed, cpu_backend, seed)


def _gguf_case(gguf_seed, cpu_backend, seed):
    DONE.add(("gguf", seed))
    data, fields, data_start, case = gguf_seed
    rng = random.Random(seed)
    mutated, what = data, []
    for _ in range(_stacked(rng)):
        if len(mutated) <= 8:
            break
        # Offsets come from the seed's map: after a splice they hit shifted bytes, which is fine here.
        mutated, step = mutate_gguf(mutated, fields, min(data_start, len(mutated) - 1), rng)
        what.append(step)
    case.write_bytes(mutated)
    _run_case(case, cpu_backend, f"gguf seed {seed}: {'; '.join(what)}")


@pytest.mark.parametrize("seed", range(HF_CASES))
def test_fuzz_hf(hf_seed, cpu_backend, seed):
    _hf_case(hf_seed, cpu_backend, seed)


def _hf_case(hf_seed, cpu_backend, seed):
    DONE.add(("hf", seed))
    path, config, weights = hf_seed
    rng = random.Random(10_000 + seed)
    config_bytes, weight_bytes, what = json.dumps(config).encode(), weights, []
    for _ in range(_stacked(rng)):
        if rng.random() < 0.45:
            current = _json_object_or(config_bytes, config)
            config_bytes, step = mutate_config(current, rng)
        else:
            try:
                weight_bytes, step = mutate_safetensors(weight_bytes, rng)
            except (ValueError, struct.error, KeyError, TypeError, AttributeError):
                continue  # an earlier mutation broke what this one would edit (harness code only)
        what.append(step)
    (path / "config.json").write_bytes(config_bytes)
    (path / "model.safetensors").write_bytes(weight_bytes)
    _run_case(path, cpu_backend, f"hf seed {seed}: {'; '.join(what)}")


def _json_object_or(raw: bytes, fallback: dict) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return fallback
    return value if isinstance(value, dict) else fallback


def _run_case(path: Path, backend, what: str) -> None:
    try:
        load_or_refuse(path, backend, what)
    except (AssertionError, LoaderHang):
        raise
    except BaseException as e:  # name the mutation next to the unexpected error
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e


def test_outcomes_are_mixed(gguf_seed, hf_seed, cpu_backend):
    """The fuzzer is not vacuous: many mutations are refused for many different reasons, and a fair
    share turn out harmless and load. In file order the cases above have run; run alone (or with
    -k), this test runs the ones that have not."""
    for seed in range(GGUF_CASES):
        if ("gguf", seed) not in DONE:
            _gguf_case(gguf_seed, cpu_backend, seed)
    for seed in range(HF_CASES):
        if ("hf", seed) not in DONE:
            _hf_case(hf_seed, cpu_backend, seed)
    total = sum(OUTCOMES.values())
    assert OUTCOMES["refused"] > 0.3 * total and OUTCOMES["loaded"] > 0.05 * total, OUTCOMES
    assert len(REASONS) >= 60, sorted(REASONS)

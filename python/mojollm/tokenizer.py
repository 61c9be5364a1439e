"""Text <-> token ids and chat prompts, built on the `tokenizers` library and jinja2.

Two sources:
  * a GGUF file's metadata (no tokenizer.json inside): `tokenizer.ggml.model` says which kind.
      gpt2  -> byte-level BPE from `tokens` + `merges`; the split regex follows `tokenizer.ggml.pre`
               the way llama.cpp does (e.g. smollm: digits one by one, then GPT-2's regex).
      llama -> sentencepiece-style BPE with byte fallback; merges from the file or, for old files,
               recovered from the token scores.
    Tokens typed CONTROL (3) become special tokens (matched whole in text, skipped when decoding);
    USER_DEFINED (4) become plain added tokens.
  * a HF directory: tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.jinja).

Chat templates are rendered the way transformers renders them (a sandboxed jinja2 environment with
trim_blocks/lstrip_blocks, `raise_exception`, a non-escaping `tojson`), so prompts are identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from mojollm.errors import ModelLoadError

# GGUF token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe")
_QWEN2_PRES = ("qwen2", "deepseek-r1-qwen")


def _byte_level_pre_tokenizer(pre: str | None, add_prefix_space: bool):
    from tokenizers import Regex, pre_tokenizers

    if pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)  # GPT-2's regex
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Old sentencepiece GGUFs carry no merges: a pair (a, b) merges when a+b is a token, ranked by its score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def _gguf_backend(meta: Mapping[str, Any]):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        # Duplicate spellings: keep the first id, as llama.cpp's text->id map does.
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
    merges_raw = meta.get("tokenizer.ggml.merges")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in merges_raw or []]
        pre = meta.get("tokenizer.ggml.pre")
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False,
                                     ignore_merges=pre in _LLAMA3_PRES))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        if merges_raw:
            merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None:
                raise ModelLoadError("sentencepiece GGUF tokenizer has neither merges nor scores")
            merges = _merges_from_scores(tokens, list(scores))
        unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True,
                                     byte_fallback=True, dropout=None))
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first" if add_prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            steps.append(decoders.Strip(content=" ", left=1))
        tok.decoder = decoders.Sequence(steps)
    else:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")

    types = list(meta.get("tokenizer.ggml.token_type") or [])
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok


class Tokenizer:
    """encode/decode/apply_chat_template over a `tokenizers.Tokenizer`."""

    def __init__(self, backend, *, bos_token_id: int | None, eos_token_ids: Iterable[int],
                 add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None,
                 special_token_strings: Mapping[str, str | None] | None = None, num_ids: int | None = None):
        self._tok = backend
        # A GGUF vocabulary may spell two ids alike; the text->id map keeps the first, so the
        # backend counts fewer entries than there are ids. Every id below num_ids is valid.
        self._num_ids = max(num_ids or 0, backend.get_vocab_size(with_added_tokens=True))
        self.bos_token_id = bos_token_id
        self.eos_token_ids = {int(i) for i in eos_token_ids if i is not None}
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.special_token_strings = dict(special_token_strings or {})

    # ---- construction ----
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], where: str = "GGUF file") -> "Tokenizer":
        try:
            backend = _gguf_backend(meta)
        except ModelLoadError as e:
            raise ModelLoadError(f"{where}: {e}") from None
        except Exception as e:  # the tokenizers library refusing the vocabulary or merges
            raise ModelLoadError(f"{where}: its tokenizer cannot be built: {e}") from None
        tokens = meta["tokenizer.ggml.tokens"]

        def token_id(key):
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        # End-of-turn / end-of-message tokens also end generation (llama.cpp does the same).
        eos_ids = {i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        names = {"bos_token": bos, "eos_token": eos, "unk_token": token_id("unknown_token_id"),
                 "pad_token": token_id("padding_token_id")}
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            special_token_strings={k: (tokens[v] if v is not None else None) for k, v in names.items()},
            num_ids=len(tokens),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json (a fast tokenizer file is required)")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelLoadError(f"{tj} is not a valid tokenizer.json: {e}") from e
        tcfg = _read_json(path / "tokenizer_config.json")
        mcfg = _read_json(path / "config.json")
        gcfg = _read_json(path / "generation_config.json")

        def token_str(key):
            v = tcfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        strings = {k: token_str(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        bos = backend.token_to_id(strings["bos_token"]) if strings["bos_token"] else None
        if bos is None:
            bos = gcfg.get("bos_token_id", mcfg.get("bos_token_id"))
        eos_ids: set[int] = set()
        for src in (mcfg.get("eos_token_id"), gcfg.get("eos_token_id")):
            if isinstance(src, int):
                eos_ids.add(src)
            elif isinstance(src, list):
                eos_ids.update(int(i) for i in src)
        if strings["eos_token"] and backend.token_to_id(strings["eos_token"]) is not None:
            eos_ids.add(backend.token_to_id(strings["eos_token"]))
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        # tokenizer.json's post-processor already adds BOS/EOS where the model wants them.
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, add_bos=False, add_eos=False,
                   chat_template=template, special_token_strings=strings)

    # ---- use ----
    @property
    def vocab_size(self) -> int:
        return self._num_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
            if self.add_eos and self.eos_token_ids:
                ids = ids + [min(self.eos_token_ids)]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {n})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @cached_property
    def _template(self):
        if not self.chat_template:
            raise ValueError("this model has no chat template: pass a plain prompt instead")
        return _compile_template(self.chat_template)

    def apply_chat_template(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        context = {k: v for k, v in self.special_token_strings.items() if v is not None}
        context.update(extra)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"the model's chat template does not parse: {e}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e

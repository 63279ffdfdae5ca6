"""Chat templates: a model's own Jinja template rendered as Hugging Face ``transformers`` renders it,
and chats encoded with a mask over the assistant turns.

``ChatTemplate.render`` mirrors ``transformers`` 5.24 ``apply_chat_template(..., tokenize=False)``:
the same sandboxed Jinja environment (``ImmutableSandboxedEnvironment`` with ``trim_blocks``,
``lstrip_blocks`` and the ``loopcontrols`` extension; ``{% generation %}`` blocks accepted), the same
``tojson`` filter, ``raise_exception`` / ``strftime_now`` / ``dict`` / ``namespace`` globals, and the
same variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named special
tokens such as ``bos_token`` / ``eos_token``, then the caller's keyword arguments). ``transformers``
is never imported; the tests use it as the oracle.

A tokenizer without a template keeps the library's plain format (``messages_prompt``: ``### Role:``
blocks); ``render_conversation`` picks one or the other. ``message_problem`` and
``conversation_problem`` are the checks the loaders (``jaxalign.data.datasets``) and the tokenising
code (``jaxalign.data.collate``) share, so a malformed conversation reads the same everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

__all__ = [
    "ChatTemplate",
    "ChatTokenizer",
    "CHAT_ROLES",
    "messages_prompt",
    "message_problem",
    "conversation_problem",
    "render_conversation",
    "encode_chat",
]

CHAT_ROLES = ("system", "user", "assistant")  # the roles encode_chat accepts (as messages_prompt)

# The plain format's role headers (no chat template): the library's own, not any model's.
_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}

# Names a message's reasoning may come under; templates read the first (transformers 5.24
# `_REASONING_FIELDS`, filled in by `_alias_reasoning_fields`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' ``AssistantTracker`` tag): renders
    its body unchanged. ``encode_chat`` finds assistant spans from the rendered prefixes instead."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' override of Jinja's filter: no HTML escaping, json.dumps options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` as templates see it: construction and ``fromkeys`` only (no attribute tricks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment of transformers 5.24 ``_cached_compile_jinja_template``."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _template_message(message: Any, turn: int) -> dict:
    """A message as transformers hands it to the template: a fresh dict without ``None`` values,
    with ``reasoning_content`` / ``thinking`` filled from older reasoning field names."""
    if not isinstance(message, Mapping):
        raise TypeError(f"message {turn} is a {type(message).__name__}, not a mapping")
    plain = {key: value for key, value in message.items() if value is not None}
    reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A model's Jinja chat template with the special-token strings it may refer to.

    Args:
        source: the Jinja source (``chat_template.jinja``, or ``tokenizer_config.json``'s
            ``chat_template``).
        bos_token: the text of the BOS token, passed to the template as ``bos_token`` (``None``:
            not passed, as transformers omits unset tokens).
        eos_token: likewise ``eos_token``.
        extra_tokens: the other named special tokens, e.g. ``{"pad_token": "<|endoftext|>"}``,
            passed under their names.

    Raises:
        jinja2.TemplateSyntaxError: if ``source`` does not parse.

    ``render`` output is byte-identical to transformers 5.24 ``apply_chat_template(messages,
    tokenize=False, ...)`` for a tokenizer with these special tokens (see the module docstring).
    """

    source: str = dataclasses.field(repr=False)
    bos_token: str | None = None
    eos_token: str | None = None
    extra_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    _compiled: jinja2.Template = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _environment().from_string(self.source))

    @property
    def token_variables(self) -> dict[str, str]:
        """The named special tokens the template sees: ``bos_token`` / ``eos_token`` when set, then
        ``extra_tokens`` (transformers' ``special_tokens_map``)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, **self.extra_tokens}
        return {name: value for name, value in named.items() if value is not None}

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the text the model was trained on.

        Args:
            messages: ``{"role": ..., "content": ..., ...}`` turns; keys with ``None`` values are
                dropped and reasoning fields aliased, as transformers does.
            add_generation_prompt: append the header that opens an assistant turn.
            tools: JSON-schema tool descriptions (dicts; transformers' callables-to-schema
                conversion is not offered), passed as ``tools``.
            documents: retrieval documents (dicts), passed as ``documents``.
            **kwargs: further template variables (e.g. ``date_string``, ``enable_thinking``); they
                override the special tokens of the same name.

        Raises:
            ValueError: if ``messages`` is empty (as transformers).
            TypeError: if a message, tool or document is not a mapping.
            jinja2.TemplateError: whatever the template raises, e.g. through ``raise_exception``
                (Gemma's "System role not supported").

        Returns:
            The rendered string, byte-identical to transformers 5.24
            ``apply_chat_template(..., tokenize=False)``.
        """
        if len(messages) == 0:
            raise ValueError("cannot render an empty conversation: give at least one message")
        chat = [_template_message(message, turn) for turn, message in enumerate(messages)]
        for kind, items in (("tool", tools), ("document", documents)):
            for index, item in enumerate(items or ()):
                if not isinstance(item, Mapping):
                    raise TypeError(f"{kind} {index} is a {type(item).__name__}, not a mapping (JSON schema dict)")
        return self._compiled.render(
            messages=chat,
            tools=None if tools is None else [dict(t) for t in tools],
            documents=None if documents is None else [dict(d) for d in documents],
            add_generation_prompt=add_generation_prompt,
            **{**self.token_variables, **kwargs},
        )


class ChatTokenizer(Protocol):
    """What ``encode_chat`` needs (``HFTokenizer`` provides it).

    ``chat_template`` may be ``None``; ``special_tokens`` are the strings the tokenizer maps to its
    special ids; ``encode_rendered`` encodes template output *with* those strings recognised and
    returns the ids and each token's ``(start, end)`` character offsets in the text.
    """

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template, or ``None``."""
        ...

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special-token strings of the vocabulary."""
        ...

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of rendered chat text, special-token strings recognised."""
        ...


def messages_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """Render chat turns as ``### Role:`` blocks, ending with an open assistant header: the plain
    format for tokenizers without a chat template (moved here from ``jaxalign.data.datasets``,
    which re-exports it).

    Args:
        messages: ``{"role": "system" | "user" | "assistant", "content": str}`` turns that come
            before the completion.

    Raises:
        KeyError: if a role is not one of the three above.

    Returns:
        ``"### User:\\n{content}\\n\\n"`` (etc.) per turn, followed by ``"### Assistant:\\n"``.
    """
    turns = "".join(f"{_ROLE_HEADERS[m['role']]}{m['content']}\n\n" for m in messages)
    return turns + _ROLE_HEADERS["assistant"]


def render_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **kwargs: Any
) -> str:
    """Render a conversation with the tokenizer's chat template, or the plain format without one.

    Args:
        tokenizer: any tokenizer; its ``chat_template`` attribute (``HFTokenizer``) is used when it
            is not ``None``. Tiktoken and SentencePiece tokenizers have none.
        messages: ``{"role", "content"}`` turns.
        add_generation_prompt: end with the header of an assistant turn (for generation).
        **kwargs: template variables (template case only; see ``ChatTemplate.render``).

    Raises:
        ValueError: if ``messages`` is empty (template case).
        KeyError: in the plain format, if a role is not ``system`` / ``user`` / ``assistant``.
        jinja2.TemplateError: whatever the template raises.

    Returns:
        With a template: ``chat_template.render(messages, add_generation_prompt=...)``. Without:
        ``messages_prompt(messages)`` (``### Role:`` blocks ending in the open assistant header)
        when ``add_generation_prompt``, else the same blocks without that final header.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        return template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    text = messages_prompt(messages)
    return text if add_generation_prompt else text[: len(text) - len(messages_prompt([]))]


def message_problem(message: Any, special_tokens: Sequence[str] = ()) -> str | None:
    """Why one chat turn cannot be rendered and encoded (``None`` if it can).

    Args:
        message: a candidate ``{"role", "content"}`` mapping (other keys are ignored).
        special_tokens: strings the content may not contain (``HFTokenizer.special_tokens``: a
            chat template's output is encoded with them recognised, so content spelling one would
            inject a control token).

    Returns:
        ``None``, or the problem naming the field: ``"is a str, not a mapping"``, ``"field 'role'
        is 'tool', not one of ['system', 'user', 'assistant']"``, ``"field 'content' is not a
        string (got int)"``, ``"field 'content' is empty"`` (blank), ``"field 'content' contains the
        special token(s) ['<|im_end|>']"``.
    """
    if not isinstance(message, Mapping):
        return f"is a {type(message).__name__}, not a mapping"
    role = message.get("role")
    if role not in CHAT_ROLES:
        return f"field 'role' is {role!r}, not one of {list(CHAT_ROLES)}"
    content = message.get("content")
    if not isinstance(content, str):
        return f"field 'content' is not a string (got {type(content).__name__})"
    if not content.strip():
        return "field 'content' is empty"
    injected = [token for token in special_tokens if token in content]
    if injected:
        return f"field 'content' contains the special token(s) {injected}"
    return None


def conversation_problem(
    messages: Any,
    *,
    special_tokens: Sequence[str] = (),
    opens: bool = False,
    ends_with_assistant: bool = False,
) -> str | None:
    """Why ``messages`` is not a usable list of chat turns (``None`` if it is).

    The checks of TRL's conversational dataset formats (TRL 0.19+ docs, "Dataset formats and
    types": a list of ``{"role", "content"}`` dicts), restricted to the roles in ``CHAT_ROLES``.

    Args:
        messages: a candidate list of turns (a JSON array of objects).
        special_tokens: strings no content may contain (see ``message_problem``).
        opens: the list starts a conversation, so its first turn may not be the assistant's.
        ends_with_assistant: the last turn must be the assistant's (a completion to train on).

    Returns:
        ``None``, or the problem: ``"is not a list of messages (got str)"``, ``"is empty"``,
        ``"message {i} {message_problem}"``, ``"message 0 is an 'assistant' turn: ..."`` or
        ``"must end with an 'assistant' message, not 'user'"``.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        return f"is not a list of messages (got {type(messages).__name__})"
    if len(messages) == 0:
        return "is empty"
    for turn, message in enumerate(messages):
        if (problem := message_problem(message, special_tokens)) is not None:
            return f"message {turn} {problem}"
    if opens and messages[0]["role"] == "assistant":
        return "message 0 is an 'assistant' turn: a conversation must open with a system or user turn"
    if ends_with_assistant and messages[-1]["role"] != "assistant":
        return f"must end with an 'assistant' message, not {messages[-1]['role']!r}"
    return None


def encode_chat(
    tokenizer: ChatTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    mask_from: int = 0,
    **kwargs: Any,
) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered chat and a mask that is True on the assistant turns.

    The assistant span of turn ``i`` is the text between ``render(messages[:i],
    add_generation_prompt=True)`` and ``render(messages[:i + 1])``: the turn's content and
    whatever the template writes after it up to the next turn (``"content<|im_end|>\\n"`` for
    ChatML, ``"content<|eot_id|>"`` for Llama 3, ``"content<end_of_turn>\\n"`` for Gemma). That is
    the span TRL's training templates wrap in ``{% generation %}`` for ``assistant_only_loss`` (for
    Qwen 2.5 TRL also takes the ``"\\n"`` after ``assistant``, part of the generation prompt here),
    so the model learns to end its turn. A token is masked if its character offsets overlap a span,
    the rule of transformers' ``return_assistant_tokens_mask``. The span is found from rendered
    text, never by searching for the content, so templates that trim or rewrite content work.

    Args:
        tokenizer: a ``ChatTokenizer`` with a chat template (``HFTokenizer``).
        messages: ``{"role": "system" | "user" | "assistant", "content": str}`` turns.
        add_generation_prompt: end with an open assistant header (its tokens are not masked).
        mask_from: assistant turns at indices below this are context, left out of the mask (the
            prompt of TRL's prompt-completion and preference formats); 0 masks every one.
        **kwargs: template variables (see ``ChatTemplate.render``).

    Raises:
        ValueError: if the tokenizer has no chat template (the plain format goes through
            ``messages_prompt`` and ``tokenize_sft``); if ``messages`` is empty; naming the turn
            and field, for an unknown role, non-string or blank content, or content containing one
            of ``tokenizer.special_tokens``; for an assistant turn at index 0; and naming the turn,
            if the template breaks the prefix property (a later turn re-renders an earlier one
            differently, e.g. Qwen3 dropping earlier thinking blocks) or renders the turn as
            nothing.
        jinja2.TemplateError: whatever the template raises (e.g. Gemma on a system turn).

    Returns:
        ``(ids, assistant_mask)``: equal-length lists; ``ids`` equals transformers 5.24
        ``apply_chat_template(messages, tokenize=True, ...)["input_ids"]`` (BOS only where the
        template writes it).
    """
    template = tokenizer.chat_template
    if template is None:
        raise ValueError(
            "the tokenizer has no chat template: without one, chats use the plain format "
            "(messages_prompt + tokenize_sft)"
        )
    if len(messages) == 0:
        raise ValueError("cannot encode an empty conversation: give at least one message")
    for turn, message in enumerate(messages):
        if (problem := message_problem(message, tokenizer.special_tokens)) is not None:
            raise ValueError(f"message {turn} {problem}")
    text = template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if turn == 0:
            raise ValueError("message 0 is an 'assistant' turn: a chat must open with a system or user turn")
        if turn < mask_from:
            continue
        prompt = template.render(messages[:turn], add_generation_prompt=True, **kwargs)
        rendered = template.render(messages[: turn + 1], **kwargs)
        if not (rendered.startswith(prompt) and text.startswith(rendered)):
            raise ValueError(
                f"message {turn}: the chat template is not prefix-consistent (rendering the chat up to "
                "this assistant turn is not a prefix of the whole chat), so its tokens cannot be located"
            )
        if len(rendered) == len(prompt):
            raise ValueError(f"message {turn}: the chat template renders this assistant turn as nothing")
        spans.append((len(prompt), len(rendered)))
    ids, offsets = tokenizer.encode_rendered(text)
    return ids, _overlap_mask(offsets, spans)


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token whose ``(start, end)`` overlaps a span (spans and offsets in order)."""
    mask = [False] * len(offsets)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[index] = end > spans[span][0]
    return mask

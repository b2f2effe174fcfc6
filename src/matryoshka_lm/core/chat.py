"""A model's own chat format, kept in its checkpoint (chat.json) from import through training, extraction and export:
its name, its chat template (Jinja, rendered as transformers renders it: a sandboxed environment, `messages` and
`add_generation_prompt`) and the token ids that end its turn (generation_config's eos_token_id, the tokenizer's eos).

A checkpoint without one (our own trained models) chats with the plain "Role: content" template of serve/protocol.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matryoshka_lm.config import load_json
from matryoshka_lm.errors import MatryoshkaError

CHAT = "chat.json"


@dataclass(frozen=True)
class ChatFormat:
    name: str | None = None  # the model's real name, e.g. SmolLM2-135M-Instruct
    template: str | None = None  # Jinja chat template; None: the plain template
    stop_ids: tuple[int, ...] = ()  # token ids that end a turn (a reply stops there, finish_reason "stop")
    bos_token: str = ""  # what the template may write as {{ bos_token }}
    eos_token: str = ""  # what the template may write as {{ eos_token }}
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the source said (kept, not read)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of `messages` ([{"role", "content"}]), ending where the assistant's reply begins."""
        if self.template is None:
            raise MatryoshkaError("this model has no chat template")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:  # templates call it to refuse a conversation
            raise MatryoshkaError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.template).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateError as e:
            raise MatryoshkaError(f"the chat template failed: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_ids"] = list(self.stop_ids)
        return d


def read_chat(ckpt: str | Path) -> ChatFormat | None:
    path = Path(ckpt) / CHAT
    if not path.is_file():
        return None
    raw = load_json(path)
    try:
        return ChatFormat(**{**raw, "stop_ids": tuple(int(i) for i in raw.get("stop_ids", ()))})
    except (TypeError, ValueError) as e:
        raise MatryoshkaError(f"bad chat format in {path}: {e}") from None


def write_chat(out: str | Path, chat: ChatFormat | None) -> None:
    if chat is not None:
        from .checkpoint import write_json

        write_json(Path(out) / CHAT, chat.to_dict())


def copy_chat(src: str | Path, out: str | Path) -> None:
    """Carry a checkpoint's chat format to one made from it (extract, quantize, a fine-tune from --init)."""
    write_chat(out, read_chat(src))

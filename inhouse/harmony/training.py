"""Conversations -> harmony training sequences: token ids plus a loss mask that is true exactly on
the tokens the model itself must produce at inference time.

Rules (so that a fine-tune keeps the harmony format instead of "reasoning forever"):
- One sequence per assistant turn that ends with a final message (it ends with `<|return|>`, the
  token inference stops on), plus one for a trailing turn that ends with tool calls (`<|call|>`).
- Inside a sequence, loss covers every assistant message after the last user message: the
  channel headers, analysis, tool-call JSON and final text, and the `<|start|>assistant` the model
  writes between its own messages; never system, developer, user or tool-result tokens.
- History is what inference would have seen: the analysis of earlier completed turns is dropped,
  the analysis inside the current turn (tool loop) is kept. openai-harmony renders each piece; we
  turn its own auto-drop off and apply this rule, then check that every prefix render is a prefix
  of the whole (so mask boundaries are exact, not guessed).
"""

from __future__ import annotations

from dataclasses import dataclass

from inhouse.harmony.conversation import (ChatMessage, ConversationError, PromptOptions,
                                          to_harmony_messages)
from inhouse.harmony.vocab import load_encoding


@dataclass(frozen=True)
class TrainingSequence:
    ids: tuple[int, ...]
    mask: tuple[bool, ...]  # mask[t]: token t is a target (predicted from ids[:t])

    @property
    def num_targets(self) -> int:
        return sum(self.mask)

    def __repr__(self) -> str:  # sizes only, never content
        return f"TrainingSequence(tokens={len(self.ids)}, targets={self.num_targets})"


def render_for_training(messages: list[ChatMessage],
                        options: PromptOptions = PromptOptions()) -> list[TrainingSequence]:
    """All training sequences of one conversation (see the module docstring)."""
    hm = to_harmony_messages(messages, options)
    roles = [_role(m) for m in hm]
    channels = [getattr(m, "channel", None) for m in hm]
    ends = [i + 1 for i, (r, c) in enumerate(zip(roles, channels))
            if r == "assistant" and c == "final" and (i + 1 == len(hm) or roles[i + 1] != "assistant")]
    if roles and roles[-1] == "assistant" and channels[-1] != "final":
        ends.append(len(hm))  # a trailing turn that ends with tool calls (or analysis only)
    if not ends:
        raise ConversationError("no assistant message to learn from")
    return [_sequence(hm, roles, channels, end) for end in ends]


def _role(message) -> str:
    return str(message.author.role.value)


def _sequence(hm: list, roles: list[str], channels: list, end: int) -> TrainingSequence:
    from openai_harmony import Conversation, RenderConversationConfig, Role as HRole

    users = [i for i in range(end) if roles[i] == "user"]
    last_user = users[-1] if users else -1
    keep = []
    for i in range(end):
        earlier_final = any(roles[j] == "assistant" and channels[j] == "final"
                            for j in range(i + 1, max(last_user, i + 1)))
        if not (roles[i] == "assistant" and channels[i] == "analysis" and i < last_user
                and earlier_final):
            keep.append(i)
    msgs = [hm[i] for i in keep]
    kept_roles = [roles[i] for i in keep]
    first_target = next((k for k, i in enumerate(keep) if i > last_user), None)
    if first_target is None or kept_roles[-1] != "assistant":
        raise ConversationError("no assistant message after the last user message")

    enc = load_encoding()
    cfg = RenderConversationConfig(auto_drop_analysis=False)
    full = list(enc.render_conversation_for_training(Conversation.from_messages(msgs), cfg))
    mask = [False] * len(full)
    k = first_target
    while k < len(msgs):
        if kept_roles[k] != "assistant":
            k += 1
            continue
        stop = k
        while stop < len(msgs) and kept_roles[stop] == "assistant":
            stop += 1
        begin = enc.render_conversation_for_completion(Conversation.from_messages(msgs[:k]),
                                                       HRole.ASSISTANT, cfg)
        finish = (full if stop == len(msgs) else
                  enc.render_conversation(Conversation.from_messages(msgs[:stop]), cfg))
        for part in (begin, finish):
            if list(part) != full[:len(part)]:
                raise ConversationError("harmony rendering is not prefix-stable here; "
                                        "cannot place the loss mask exactly")
        for t in range(len(begin), len(finish)):
            mask[t] = True
        k = stop
    return TrainingSequence(tuple(full), tuple(mask))

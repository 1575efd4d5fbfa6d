"""Run one question (all its turns) through a generator function."""

from __future__ import annotations

from ..engine import Engine, GenerationResult
from .dataset import Question


def messages_for(question: Question, answers: list[str], turn: int) -> list[dict]:
    msgs: list[dict] = []
    for i in range(turn + 1):
        msgs.append({"role": "user", "content": question.turns[i]})
        if i < turn:
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


def plain_prompt_for(question: Question, answers: list[str], turn: int) -> str:
    """For models without a chat template: a plain transcript."""
    parts = []
    for i in range(turn + 1):
        parts.append(f"Question: {question.turns[i]}\nAnswer:")
        if i < turn:
            parts[-1] += f" {answers[i]}\n"
    return "\n".join(parts)


def run_question(
    engine: Engine, question: Question, max_new_tokens: int, **kw
) -> list[GenerationResult]:
    """All turns of ``question``, each answer kept in the next turn's context."""
    has_chat = bool(getattr(engine.tokenizer, "chat_template", None))
    answers: list[str] = []
    results = []
    for turn in range(len(question.turns)):
        if has_chat:
            prompt = messages_for(question, answers, turn)
        else:
            prompt = plain_prompt_for(question, answers, turn)
        res = engine.generate(prompt, max_new_tokens, **kw)
        answers.append(res.text)
        results.append(res)
    return results

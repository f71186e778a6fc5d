"""The paper's judge: a few-shot LLM over any OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import threading

from sku.errors import first_line
from sku.evaluation.judges.parse import parse_verdict
from sku.evaluation.judges.prompt import RESPONSE_SCHEMA, build_messages, examples_tag
from sku.evaluation.judges.verdict import JudgeError, Verdict


class OpenAIJudge:
    """GPT-4-style few-shot judge over the OpenAI SDK; `base_url` selects any compatible server.
    The SDK retries 408/409/429/5xx and connection errors with exponential backoff."""

    remote = True  # each verdict is a paid request: asked concurrently, and cached

    def __init__(self, model: str, base_url: str | None = None, max_retries: int = 6,
                 timeout: float = 120.0, examples=None):
        try:
            import openai
        except ImportError:
            raise JudgeError("--judge openai needs the openai package (pip install openai)"
                             ) from None
        api_key = os.environ.get("OPENAI_API_KEY")
        if not api_key and not base_url:
            raise JudgeError("--judge openai: set OPENAI_API_KEY, or pass --base-url for a "
                             "server that needs no key")
        self._openai = openai
        self.client = openai.OpenAI(api_key=api_key or "unused", base_url=base_url,
                                    max_retries=max_retries, timeout=timeout)
        self.model = model
        self.examples = examples  # None: the built-in stand-ins
        self.name = f"openai:{model}{examples_tag(examples)}"
        self.url = str(self.client.base_url)
        # Sent while the server accepts them; one it rejects by name is dropped for good.
        self._optional = {
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "verdict", "schema": RESPONSE_SCHEMA, "strict": True}},
            "temperature": 0,
        }
        self._lock = threading.Lock()

    def _complete(self, messages: list[dict]) -> str:
        while True:
            optional = dict(self._optional)
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, **optional)
            except json.JSONDecodeError as e:  # a body that is not JSON (decoded as is)
                raise JudgeError(f"judge server {self.url} answered malformed JSON: "
                                 f"{first_line(e)}") from None
            except self._openai.BadRequestError as e:
                rejected = [key for key in optional if key in str(e)]
                if not rejected:
                    raise
                with self._lock:
                    for key in rejected:
                        self._optional.pop(key, None)
                continue
            try:  # the SDK builds the reply from the body unchecked
                content = reply.choices[0].message.content
                if content is None or isinstance(content, str):
                    return content or ""
            except (AttributeError, IndexError, KeyError, TypeError):
                pass
            raise JudgeError(f"judge server {self.url} answered JSON that is not a chat "
                             "completion (no choices[0].message.content string)")

    def __call__(self, prompt: str, response: str) -> Verdict:
        openai = self._openai
        try:
            text = self._complete(build_messages(prompt, response, self.examples))
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise JudgeError(f"judge server {self.url} unreachable: "
                             f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
                             ) from None
        except openai.APIStatusError as e:
            raise JudgeError(f"judge server {self.url} answered HTTP {e.status_code}: "
                             f"{str(e.message).splitlines()[0]}") from None
        harmful, category, reason = parse_verdict(text)
        return Verdict(harmful, category, reason, self.name)

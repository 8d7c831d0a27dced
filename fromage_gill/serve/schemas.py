"""The OpenAI chat-completions request as pydantic models (what FastAPI validates), with the project's own settings as
extra top-level fields (the ``openai`` client sends them with ``extra_body=``).

Unknown fields are refused (a typo in ``ret_scale_factor`` must not be silently ignored); the OpenAI fields this
server cannot honour are refused unless they carry their neutral value (``n=1``, penalties 0, no logprobs).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str
    detail: str | None = None  # OpenAI's resolution hint; the model always sees 224 px


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    # ignore: clients echo an answer back whole, with its ``images`` and ``refusal`` fields
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's sampling fields, mapped onto GenerationSettings (None: the model's default)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # OpenAI fields accepted only at their neutral value
    n: Literal[1] = 1
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    user: str | None = None
    # the project's own (GenerationSettings fields; docs/generation.md)
    mode: Literal["auto", "retrieve", "generate", "text"] | None = None
    ret_scale_factor: float | None = None
    gen_scale_factor: float | None = None
    image_logit_bias: float | None = None
    top_k: int | None = None
    min_word_tokens: int | None = None
    max_images: int | None = None
    text_after_images: bool | None = None
    image_query: Literal["dialogue", "answer"] | None = None
    retrieval_candidates: int | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    steps: int | None = None  # short for num_inference_steps
    decoding: str | None = None
    answer_style: Literal["full", "published"] | None = None
    index: str | None = None  # which loaded image index to retrieve from (GET /v1/models lists them)


# GenerationSettings field -> the request field that sets it (for error messages that name what the client sent)
SETTING_FIELDS = {"max_new_tokens": "max_tokens", "stop_strings": "stop", "num_inference_steps": "steps"}
EXTRA_SETTINGS = (
    "mode",
    "ret_scale_factor",
    "gen_scale_factor",
    "image_logit_bias",
    "top_k",
    "min_word_tokens",
    "max_images",
    "text_after_images",
    "image_query",
    "retrieval_candidates",
    "guidance_scale",
    "num_inference_steps",
    "decoding",
    "answer_style",
)

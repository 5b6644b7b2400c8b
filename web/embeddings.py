"""`POST /v1/embeddings` in OpenAI's shape, so tools that speak that API (LangChain,
LlamaIndex, vector-database connectors) can use the served model; `GET /v1/models`.

Images travel as Infinity's multimodal embeddings API takes them: with `"modality": "image"`
every input is an image, as a data URI or bare base64. Without `modality`, inputs that are
image data URIs are images and the others texts, so one request can mix them. URLs are
refused, never fetched. `usage` counts no tokens (the tokenizer runs on the server, which
does not report counts), so its figures are 0.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from clipsearch.web.api import web_state
from clipsearch.web.errors import invalid
from clipsearch.web.inputs import decode_image, is_image_data_uri

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(description="a text or image, or a list of them")
    model: str = Field(
        default="", description="the served model's name or id; empty: the first server"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        default=None, description="must equal the model's dimension if given"
    )
    user: str | None = None
    modality: Literal["text", "image"] | None = Field(
        None, description="Infinity's field: 'image' reads every input as an image"
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "clipsearch"


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


@router.post("/embeddings", summary="OpenAI-compatible embeddings of texts and images")
async def embeddings(body: EmbeddingsIn, request: Request) -> EmbeddingsOut:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise invalid("input must not be empty")
    if len(inputs) > MAX_INPUTS:
        raise invalid(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
    backend = await web_state(request).backends.by_model(body.model)
    served = await backend.server_info()
    if body.dimensions is not None and body.dimensions != served.dim:
        raise invalid(f"{served.model_name} has dimension {served.dim}, not {body.dimensions}")

    def is_image(value: str) -> bool:
        if body.modality is not None:
            return body.modality == "image"
        return is_image_data_uri(value)

    image_rows = [i for i, value in enumerate(inputs) if is_image(value)]
    text_rows = [i for i, value in enumerate(inputs) if not is_image(value)]
    vectors = np.zeros((len(inputs), served.dim), dtype=np.float32)
    if text_rows:
        texts = [inputs[i] for i in text_rows]
        if any(not text for text in texts):
            raise invalid("an input text is empty")
        vectors[text_rows] = (await backend.client.encode_texts(texts)).vectors
    if image_rows:
        images = [decode_image(inputs[i], what=f"input[{i}]") for i in image_rows]
        vectors[image_rows] = (await backend.client.encode_images(images)).vectors
    return EmbeddingsOut(
        data=[
            Embedding(index=i, embedding=_encode(row, body.encoding_format))
            for i, row in enumerate(vectors)
        ],
        model=served.model_name,
        usage=Usage(),
    )


def _encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what OpenAI's clients decode: little-endian float32
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in row]


@router.get("/models", summary="the served models, in OpenAI's shape")
async def models(request: Request) -> ModelsOut:
    backends = web_state(request).backends.all()
    names = [(await backend.server_info()).model_name for backend in backends]
    return ModelsOut(data=[ModelOut(id=name) for name in dict.fromkeys(names)])

from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.chat import ChatService
from app.schemas import ChatCompletion, ChatCompletionRequest


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["chat"]

    @post(status_code=200, summary="Create a chat completion over an image")
    async def create(self, data: JSONBody[ChatCompletionRequest], chat: NamedDependency[ChatService]) -> ChatCompletion:
        return await chat.complete(data)

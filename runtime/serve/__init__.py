"""`sdonnx serve`: AUTOMATIC1111's and OpenAI's image HTTP APIs and a page over one Pipeline (the [serve] extra).

Importing this package imports nothing of the web stack: `app` needs fastapi, `ray` needs ray[serve]; `worker`,
`a1111`, `openai` and `codec` need only the runtime."""

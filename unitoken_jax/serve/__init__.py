"""`unitoken serve`: an OpenAI-compatible HTTP server for a `UniTokenPipeline`.

    from unitoken_jax.serve import ServeSettings, create_app, run
    run(pipe, ServeSettings(model_name="unitoken-shapes", api_key="..."), port=8000)

`app` has the endpoints, `wire` OpenAI's request and response format, `scheduler` the worker that
batches calls, `engine` the padded batches it runs, `metrics` the Prometheus text.
"""

from unitoken_jax.serve.app import ServeSettings, bind, create_app, run  # noqa: F401

"""The service's routers, one module per route family; server/app.py mounts them.

    generate.py   POST /v1/generate (JSON -> wav | zip of wavs)
    progress.py   GET /v1/progress/{id} (server-sent events), GET /v1/prefix/{id} (hybrid prefix audio)
    edit.py       POST /v1/edit (infill of an uploaded clip)
    stream.py     POST /v1/stream and its events and chunks (long-form, window by window)
    speech.py     POST /v1/speech/edit (PlayDiffusion)

A router takes what it serves (the model, its limits) and the service's `Jobs` (server.jobs);
it imports the layers below it (server.jobs, runner, body, schema, progress; the public surface
and the engine), never server.app, so app.py imports them at its top. What a route runs on the
model is data (a server.runner.Work, or generate rows), so it runs wherever the model is: on
this process's worker, or on a Ray replica.
"""

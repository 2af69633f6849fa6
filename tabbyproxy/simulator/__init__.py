"""
A GPU-free stand-in for TabbyAPI (HEAD e632af4), run as ``python -m tabbyproxy.simulator``.

The proxy supervises TabbyAPI as a child process, and its tests need a child that starts, answers,
streams, fails and dies the way the real server does, in milliseconds and without a model.  This
program is that child: it reads ``config.yml`` from its working directory and an optional
``--config`` override exactly like TabbyAPI, prints TabbyAPI-style console lines to stdout (the
proxy only ever sees TabbyAPI's console through a pipe), and serves TabbyAPI's HTTP API with
deterministic generated text.  Misbehaviour for tests is switched on by a ``simulator:`` section in
the merged config, which real TabbyAPI silently ignores; see L{tabbyproxy.simulator.knobs}.

The wire details (status codes, JSON bodies, header rules, SSE framing) follow
``reference/tabbyapi.md`` and the captures of a real TabbyAPI; where the two differ from the OpenAI
API the TabbyAPI behaviour wins, quirks included, because the proxy must cope with the real thing.
"""

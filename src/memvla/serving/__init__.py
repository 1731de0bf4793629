"""Serving a memvla policy to robots: openpi's websocket protocol, one episode state per
session, batching across sessions (``memvla serve``; the client is :mod:`memvla.client`).

- :mod:`.protocol`: msgpack with numpy arrays in openpi's encoding, never unpickling;
- :mod:`.observation`: a robot's message -> a checked policy batch of one, ``--keymap``;
- :mod:`.session`: a session's episode state, queue and noise, swapped into the policy;
- :mod:`.batcher`: requests of many sessions as one batched policy call;
- :mod:`.server`: the asyncio websocket server (healthz, API key, limits, SIGTERM);
- :mod:`.remote_eval`: ``memvla eval --server``, local evaluation's loop over the network.

Imported lazily: ``websockets`` and ``msgpack`` come with ``pip install 'memvla[serve]'``.
"""

from __future__ import annotations

__all__ = ["PolicyServer", "ServeConfig", "ServerThread", "serve_forever"]


def __getattr__(name: str):
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)

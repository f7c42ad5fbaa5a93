"""The ranking service (``streamrec serve``): HTTP API (:mod:`serving.api`), model slots and arms
(:mod:`serving.models`), micro-batching (:mod:`serving.batcher`), candidates (:mod:`serving.catalogue`),
served impressions and stats (:mod:`serving.emit`), the server and CLI (:mod:`serving.service`), and small
keep-alive HTTP clients for callers (:mod:`serving.client`).

Depends on trainer, streams, embedding_store and config; nothing below it imports serving."""

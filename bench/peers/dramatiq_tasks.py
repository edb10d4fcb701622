import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

PORT = int(os.environ.get("PEERS_REDIS_PORT", "6390"))
broker = RedisBroker(url=f"redis://127.0.0.1:{PORT}/2")
broker.add_middleware(Results(backend=RedisBackend(url=f"redis://127.0.0.1:{PORT}/3")))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop(x):
    return x

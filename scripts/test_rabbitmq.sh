#!/usr/bin/env bash
# The pipeline and poison tests again with RabbitMQ as the broker (Redis stays the result backend and cache), plus
# the RabbitMQ-only tests (tests/test_rabbitmq.py: topology, dead letters kept by the broker, failover, users;
# tests/test_rabbitmq_faults.py: workers killed under load and a broker restart, on a node of its own;
# tests/test_rabbitmq_cluster.py: a 3-node cluster losing the ingest queue's leader mid-import). Each
# test process works in a private virtual host of the RabbitMQ at MEMQ_TEST_RABBITMQ_URL (default this machine's,
# amqp://guest:guest@127.0.0.1:5672), made with `memq broker setup` and deleted at the end. Without a reachable
# RabbitMQ (or rabbitmqctl) every test is skipped with a message naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
unset PYTHONDONTWRITEBYTECODE
export MEMQ_TEST_BROKER=rabbitmq
python -m pytest -p no:cacheprovider -n "${MEMQ_TEST_PROCESSES:-2}" "$@" \
  tests/test_rabbitmq_cluster.py tests/test_rabbitmq_faults.py tests/test_rabbitmq.py tests/test_pipeline.py tests/test_poison.py

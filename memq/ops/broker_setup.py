"""``memq broker setup``: declares memq's RabbitMQ topology (``memq.core.broker``) on the configured broker,
idempotently, over AMQP with the URL's own user (it needs ``configure``); AMQP cannot set a policy, so the
delivery-limit policy goes through the management HTTP API or ``rabbitmqctl`` (docs/operations.md, "RabbitMQ as the
broker"). A policy, not a queue argument: another ``--delivery-limit`` applies to the existing queues at once.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import amqp.exceptions
import kombu.exceptions
from kombu import Connection, Exchange, Queue

from memq.core import broker
from memq.core.settings import Settings
from memq.errors import ConfigError, TransientError

CONNECT_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 10.0
CTL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SetupReport:
    vhost: str
    exchanges: list[str]
    queues: list[str]
    policy: dict[str, Any]
    policy_applied_by: str  # "management-api" | "rabbitmqctl" | "" (not applied: printed for the operator)


def setup(
    settings: Settings,
    delivery_limit: int = broker.DEFAULT_DELIVERY_LIMIT,
    management_url: str | None = None,
    rabbitmqctl: str | None = None,
) -> SetupReport:
    """Declares the topology on ``settings.broker_url`` and applies the policy where a way to do so is given."""
    if not broker.is_amqp(settings.broker_url):
        raise ConfigError("MEMQ_BROKER_URL must be an amqp:// URL for `memq broker setup` (Redis needs no setup)")
    if delivery_limit < 1:
        raise ConfigError("--delivery-limit must be a positive integer")
    vhost = broker.vhost_of(settings.broker_url)
    wanted = broker.definitions(vhost, settings.search_shards, delivery_limit)
    declare(settings.broker_url, wanted)
    policy = wanted["policies"][0]
    applied_by = ""
    if management_url:
        put_policy(management_url, policy)
        applied_by = "management-api"
    elif rabbitmqctl:
        set_policy_with_ctl(rabbitmqctl, policy)
        applied_by = "rabbitmqctl"
    exchanges, queues = ([item["name"] for item in wanted[kind]] for kind in ("exchanges", "queues"))
    return SetupReport(vhost, exchanges, queues, policy, applied_by)


def declare(broker_url: str, wanted: dict[str, Any]) -> None:
    try:
        with Connection(broker_url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
            channel = connection.default_channel
            for item in wanted["exchanges"]:
                Exchange(item["name"], type=item["type"], durable=True).declare(channel=channel)
            for item in wanted["queues"]:
                Queue(item["name"], durable=True, queue_arguments=item["arguments"]).declare(channel=channel)
            for item in wanted["bindings"]:
                channel.queue_bind(item["destination"], item["source"], item["routing_key"])
    except amqp.exceptions.PreconditionFailed as exc:
        raise ConfigError(f"the broker holds a queue or exchange of the same name declared otherwise: {exc}") from None
    except amqp.exceptions.AccessRefused as exc:
        raise ConfigError(f"the broker refused this user (it needs the configure permission): {exc}") from None
    except (OSError, kombu.exceptions.OperationalError, amqp.exceptions.AMQPError) as exc:
        raise TransientError(f"RabbitMQ unreachable: {exc}") from None


def put_policy(management_url: str, policy: dict[str, Any]) -> None:
    """``PUT /api/policies/<vhost>/<name>`` with the URL's user (``http://user:password@host:15672``)."""
    parts = urlsplit(management_url)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
    url = f"{base}/api/policies/{quote(policy['vhost'], safe='')}/{quote(policy['name'], safe='')}"
    body = {key: policy[key] for key in ("pattern", "apply-to", "priority", "definition")}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    request.add_header("content-type", "application/json")
    if parts.username:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"the management API refused the policy: HTTP {exc.code} {exc.reason}") from None
    except OSError as exc:
        raise TransientError(f"management API unreachable: {exc}") from exc


def set_policy_with_ctl(rabbitmqctl: str, policy: dict[str, Any]) -> None:
    command = [rabbitmqctl, "set_policy", "-p", policy["vhost"], "--apply-to", policy["apply-to"]]
    command += [
        "--priority",
        str(policy["priority"]),
        policy["name"],
        policy["pattern"],
        json.dumps(policy["definition"]),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CTL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransientError(f"rabbitmqctl failed: {exc}") from exc
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise TransientError(f"rabbitmqctl set_policy failed: {message[0]}")

"""`skewless pubsub-setup`: create the topics and subscriptions of the streaming jobs (re-runnable).

For a local run on the Pub/Sub emulator (PUBSUB_EMULATOR_HOST set) or a real project: the events
topic with the jobs' subscription, and the dead-letter and prediction topics. Existing ones are
kept, so the command can be run again.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from skewless.beam_pipelines.runtime.job import Job
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.process import configure_logging

DESCRIPTION = (
    "Create Pub/Sub topics and subscriptions for the streaming jobs (idempotent): "
    "--topic T [--subscription S] [--topic T2 ...]; short names are put in --project."
)

JOB = Job(
    name="pubsub-setup",
    summary="create Pub/Sub topics and subscriptions",
    description=DESCRIPTION,
    beam=False,
)



def _path(project: str, kind: str, name: str) -> str:
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


def ensure(project: str, topics: Sequence[str], subscriptions: Sequence[tuple[str, str]]) -> dict:
    """Create missing topics and (subscription, topic) pairs; say what was created or kept."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    out = {"created": [], "existing": []}
    for topic in topics:
        try:
            publisher.create_topic(name=topic)
            out["created"].append(topic)
        except AlreadyExists:
            out["existing"].append(topic)
    for subscription, topic in subscriptions:
        try:
            subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
            out["created"].append(subscription)
        except AlreadyExists:
            out["existing"].append(subscription)
    subscriber.close()
    return out


def run(argv: Sequence[str] | None = None) -> dict:
    configure_logging()
    parser = argparse.ArgumentParser(
        prog="skewless pubsub-setup", description=DESCRIPTION, allow_abbrev=False
    )
    parser.add_argument(
        "--project", required=True, help="Project of short topic/subscription names."
    )
    parser.add_argument(
        "--topic", action="append", default=[], help="A topic to create (repeatable)."
    )
    parser.add_argument(
        "--subscription",
        action="append",
        default=[],
        help="SUBSCRIPTION=TOPIC, or SUBSCRIPTION alone for the first --topic (repeatable).",
    )
    args = parser.parse_args(argv)
    topics = [_path(args.project, "topics", t) for t in args.topic]
    pairs = []
    for spec in args.subscription:
        name, _, topic = spec.partition("=")
        if not topic and not topics:
            raise SystemExit(f"skewless pubsub-setup: subscription {name!r} needs a topic")
        topic_path = _path(args.project, "topics", topic) if topic else topics[0]
        if topic_path not in topics:
            topics.append(topic_path)
        pairs.append((_path(args.project, "subscriptions", name), topic_path))
    if not topics:
        raise SystemExit("skewless pubsub-setup: nothing to create (give --topic)")
    result = ensure(args.project, topics, pairs)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    launch(JOB, run)

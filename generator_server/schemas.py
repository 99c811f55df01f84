"""The bodies of the HTTP contract: defined once, in ``online_dpo_protocol.models`` (the trainer's client
reads the answers with them too); every name of it re-exported here for the server's modules, so that a
model added there needs no second line here."""

from online_dpo_protocol.models import *  # noqa: F403

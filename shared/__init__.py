"""What several Warlock services share: wire messages, subjects, settings, errors, tokens, logging.

Nothing here opens a connection; NATS-only helpers live in `shared.natsx`, which the agent never imports.
"""

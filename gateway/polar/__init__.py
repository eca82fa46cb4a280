"""Polar, the merchant of record: everything that talks to it or acts on what it says.

`client`: the only Polar client (polar-sdk). `sync`: the outbox sync of usage events.
`limits`: the background refresh of cached customer limits. `webhooks`: verified Polar
deliveries. `commands`: the bodies of the Polar CLI commands (`gateway sync`, `gateway polar ...`).
"""

"""A local HTTP server that speaks the Anthropic API, with a ledger of what it billed.

Modules: __main__ (CLI), app (routes), settings (what it does, and their checks), validate
(request checks), errors (status map), shapes (response JSON), tokens (counts and replies),
pricing, ledger, limits (rate-limit buckets), faults (injected errors), cache (prompt
caching), batches (Message Batches), clock (the clock POST /_sim/advance moves), truth (the
synthetic ground truth: difficulty, skill, right or wrong), grades (its record and
/_sim/grade).
"""

"""A local HTTP server that speaks the Anthropic API, with a ledger of what it billed."""

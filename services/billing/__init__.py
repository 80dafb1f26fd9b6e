"""Billing: hourly usage ledger, invoices with AISS subsidy, finalization, read API
(docs/contracts.md §3-5)."""

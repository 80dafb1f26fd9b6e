"""Billing: hourly usage ledger, invoices with AISS subsidy, finalization, read API (CONTRACTS §3-5)."""

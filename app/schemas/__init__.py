"""Pydantic schemas of the API: one family per resource."""

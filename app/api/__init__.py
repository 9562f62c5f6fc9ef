"""Thin routers: a schema in, one service call, a schema out."""

"""Plugins around the merge: pre-merge transforms and lambda optimizers."""

"""Environments: episodes, tools and rewards for each task (`research`)."""

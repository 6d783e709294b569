"""A command's run: its typed options (each with the checks that need no teacher), its folder's layout and identity,
and the results kept there."""

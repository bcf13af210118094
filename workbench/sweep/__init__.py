"""`workbench sweep`: grid and random searches over recipe overrides, with a leaderboard."""

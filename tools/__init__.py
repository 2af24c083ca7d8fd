"""Development tools that ship in the repository, not in the installed wheel (demo-pack training)."""

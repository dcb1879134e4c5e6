"""more-fl tests, by topic: engine/, tasks/, federation/, flower/, tools/, e2e/."""

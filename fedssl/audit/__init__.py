"""`fedssl audit`: verify the privacy ledgers and re-account ε (ledgers), or test the mechanism with canaries (empirical)."""

"""Real servers on 127.0.0.1 that integration tests start, edit and stop."""

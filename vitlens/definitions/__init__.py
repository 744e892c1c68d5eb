"""One module per analysis: its result type, its public function and its registry entry."""

"""Graph passes, one per file. `ditpass.passes.registry` orders them."""

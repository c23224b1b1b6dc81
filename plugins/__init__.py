"""loopserve's built-in plugins: each module is registered through the entry-point group
``loopserve`` exactly like a third-party plugin, and can be blocked with
``plugins.disable=[name]``."""

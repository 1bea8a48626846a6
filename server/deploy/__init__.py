"""Scale-out on Ray Serve (`loraplex serve --replicas N`); needs the `ray` extra."""

"""The HTTP face: the app factory, its routes, the server protocol and the layers every request passes."""

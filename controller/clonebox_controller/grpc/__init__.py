"""gRPC servicers and proto conversion of the controller."""

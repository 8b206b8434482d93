"""server/grpc_api"""

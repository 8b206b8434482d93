"""server/http_api"""

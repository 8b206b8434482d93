"""server/catalog"""
